"""CPU smoke tests of the demo-model training script: per-layer balance loss, LR schedule, train step, end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--hidden",
    "32",
    "--intermediate",
    "16",
    "--layers",
    "3",
    "--heads",
    "2",
    "--experts",
    "8",
    "--top-k",
    "2",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "training" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = module
    spec.loader.exec_module(module)
    return module


td = _load_script()


def _collapsed(num_tokens: int, num_experts: int, experts: tuple[int, int]) -> torch.Tensor:
    """Router logits [T, E] that send every token to ``experts`` with probability ~1/2 each."""
    logits = torch.full((num_tokens, num_experts), -30.0)
    logits[:, list(experts)] = 10.0
    return logits


def test_balance_loss_is_one_when_balanced_and_counts_each_layer() -> None:
    uniform = torch.zeros(16, 8)  # [T, E]: every probability 1/8
    balance, z = td.routing_losses((uniform, uniform, uniform), top_k=2)
    assert balance.item() == pytest.approx(3.0)  # 1.0 per layer
    assert z.item() == pytest.approx(3 * math.log(8) ** 2)


def test_per_layer_loss_sees_collapse_that_pooling_hides() -> None:
    # two layers, each collapsed onto two experts, but on different experts: pooled over layers it looks half-balanced
    layers = (_collapsed(32, 8, (0, 1)), _collapsed(32, 8, (2, 3)))
    balance, _ = td.routing_losses(layers, top_k=2)
    assert balance.item() == pytest.approx(2 * 8 / 2, rel=1e-4)  # E/2 per collapsed layer
    pooled = load_balancing_loss_func(layers, num_experts=8, top_k=2)
    # transformers' pooled loss is K when balanced: per balanced unit it sees 2x, while each layer is 4x off balance
    assert float(pooled) / 2 == pytest.approx(2.0)
    assert float(pooled) / 2 < balance.item() / 2 - 1.0


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    args = td.parse_args(["--lr", "1e-3", "--warmup", "10", "--steps", "110", "--min-lr-frac", "0.1"])
    assert td.lr_at(0, args) == pytest.approx(1e-4)
    assert td.lr_at(9, args) == pytest.approx(1e-3)
    assert td.lr_at(60, args) == pytest.approx(0.55e-3)
    assert td.lr_at(110, args) == pytest.approx(1e-4)


def test_train_step_fits_a_batch_and_trains_every_router() -> None:
    args = td.parse_args([*TINY, "--device", "cpu", "--lr", "1e-2", "--experts-impl", "eager"])
    model = td.build_model(td.model_config(args, vocab_size=64, eos_id=0), args, print)
    routers = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tokens = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))  # [B, S]
    first = td.train_step(model, opt, tokens, args)
    for _ in range(15):
        last = td.train_step(model, opt, tokens, args)
    assert last["ce"] < first["ce"] - 0.5
    assert first["balance"] == pytest.approx(1.0, abs=0.2)
    for before, layer in zip(routers, model.model.layers):
        assert not torch.equal(before, layer.mlp.gate.weight.detach())


def test_main_end_to_end_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "data"
    (data / "tokens").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("code-train", "code-test", "prose-train", "prose-test"):
        np.save(data / "tokens" / f"{name}.npy", rng.integers(1, 8192, size=2000).astype(np.uint16))
    out = tmp_path / "ckpt"
    argv = [
        *TINY,
        "--data",
        str(data),
        "--tokenizer",
        str(ROOT / "models" / "demo"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--experts-impl",
        "eager",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--eval-every",
        "2",
        "--eval-windows",
        "2",
        "--final-eval-windows",
        "4",
        "--sample-tokens",
        "3",
        "--json",
        str(tmp_path / "r.json"),
        "--log",
        str(tmp_path / "r.log"),
    ]
    result = td.main(argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["steps_run"] == 4 and saved["args"]["seed"] == 1234 and len(saved["history"]) == 2
    assert set(saved["final"]) == {"code-test", "code-train", "prose-test", "prose-train"}
    assert len(result["final"]["code-test"]["entropy_ratio"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 0 and tok("x = 1").input_ids[0] == 0
    assert "step 3" in (tmp_path / "r.log").read_text()
