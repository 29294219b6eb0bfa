"""Tests of model/synth.py: on-disk key names match save_pretrained, sharded streaming, real geometry, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

from moeflow.errors import MoeflowError
from moeflow.model import synth
from moeflow.model.synth import INDEX_FILE, synth_config, tensor_specs, write_checkpoint

FAMILIES = ("olmoe", "qwen3-30b", "mixtral")


def tiny_config(like: str, layers: int = 2) -> PretrainedConfig:
    """The family's config with tiny, pairwise distinct sizes (so a transposed shape cannot pass)."""
    config = synth_config(like, num_layers=layers, dtype="bfloat16")
    config.hidden_size, config.vocab_size = 24, 96
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    config.num_experts_per_tok = 2
    if hasattr(config, "head_dim"):
        config.head_dim = 6
    if like == "mixtral":
        config.num_local_experts, config.intermediate_size = 5, 10
    elif like == "olmoe":
        config.num_experts, config.intermediate_size = 5, 10
    else:
        config.num_experts, config.moe_intermediate_size, config.intermediate_size = 5, 10, 40
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return config


def disk_tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in the safetensors files of ``directory``."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return found


@pytest.mark.parametrize("like", FAMILIES)
def test_key_set_matches_save_pretrained(like: str, tmp_path: Path) -> None:
    config = tiny_config(like)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ref")
    reference = disk_tensors(tmp_path / "ref")
    ours = {s.name: (s.shape, "BF16") for s in tensor_specs(config)}
    assert ours == reference
    assert any(".experts.4." in name for name in ours)  # per-expert keys, as real checkpoints have


@pytest.mark.parametrize("like", FAMILIES)
def test_written_checkpoint_loads_in_transformers(like: str, tmp_path: Path) -> None:
    config = tiny_config(like)
    out = write_checkpoint(config, tmp_path / "ckpt", seed=3, shard_bytes=8_000, progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    on_disk = disk_tensors(out)
    assert set(index["weight_map"]) == set(on_disk)
    assert index["metadata"]["total_size"] == sum(2 * torch.Size(s).numel() for s, _ in on_disk.values())
    assert not list(out.glob("tokenizer*"))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.architectures == [type(model).__name__]
    params = dict(model.named_parameters())
    assert next(iter(params.values())).dtype == torch.bfloat16
    embed = params["model.embed_tokens.weight"].float()
    assert embed.std().item() == pytest.approx(0.02, rel=0.15) and abs(embed.mean().item()) < 0.005
    assert (params["model.norm.weight"] == 1).all()


def test_seed_decides_the_weights(tmp_path: Path) -> None:
    a = write_checkpoint(tiny_config("olmoe", 1), tmp_path / "a", seed=1, progress=False)
    b = write_checkpoint(tiny_config("olmoe", 1), tmp_path / "b", seed=1, progress=False)
    c = write_checkpoint(tiny_config("olmoe", 1), tmp_path / "c", seed=2, progress=False)
    read = lambda d: (d / "model-00001-of-00001.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)


@pytest.mark.parametrize(
    ("like", "arch", "params", "layers", "experts", "expert_key", "expert_shape"),
    [
        ("olmoe", "OlmoeForCausalLM", 6.92e9, 16, 64, "model.layers.15.mlp.experts.63.gate_proj.weight", (1024, 2048)),
        ("qwen3-30b", "Qwen3MoeForCausalLM", 30.5e9, 48, 128, "model.layers.47.mlp.experts.127.down_proj.weight", (2048, 768)),
        ("mixtral", "MixtralForCausalLM", 46.7e9, 32, 8, "model.layers.31.block_sparse_moe.experts.7.w1.weight", (14336, 4096)),
    ],
)  # fmt: skip
def test_real_geometry(like, arch, params, layers, experts, expert_key, expert_shape) -> None:
    # Published totals: OLMoE-1B-7B 6.9B, Qwen3-30B-A3B 30.5B, Mixtral-8x7B 46.7B parameters.
    config = synth_config(like)
    specs = {s.name: s for s in tensor_specs(config)}
    total = sum(torch.Size(s.shape).numel() for s in specs.values())
    assert total == pytest.approx(params, rel=0.01)
    assert specs[expert_key].shape == expert_shape
    assert config.num_hidden_layers == layers and config.num_experts_per_tok in (2, 8)
    assert sum(".experts." in k and k.startswith("model.layers.0.") for k in specs) == 3 * experts
    assert config.architectures == [arch]


def test_layers_truncate_depth() -> None:
    specs = tensor_specs(synth_config("mixtral", num_layers=2))
    assert {int(s.name.split(".")[2]) for s in specs if s.name.startswith("model.layers.")} == {0, 1}


def test_refuses_when_disk_is_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(MoeflowError, match=r"needs .* but .* has only .*--layers"):
        write_checkpoint(tiny_config("olmoe", 1), tmp_path / "new" / "ckpt", progress=False)
    assert not (tmp_path / "new").exists()


def test_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(MoeflowError, match="not empty"):
        write_checkpoint(tiny_config("olmoe", 1), tmp_path, progress=False)
    with pytest.raises(MoeflowError, match="unknown --like"):
        synth_config("llama")


def test_synth_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moeflow.cli import main

    monkeypatch.setattr(synth, "synth_config", lambda like, n, dtype: tiny_config(like, n or 2))
    assert main(["synth", "--like", "qwen3-30b", "--out", str(tmp_path / "q"), "--layers", "1"]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_hidden_layers"] == 1
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert main(["synth", "--like", "olmoe", "--out", str(tmp_path / "q")]) == 2
    assert "not empty" in capsys.readouterr().err


def byte_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer with no merges (ids 0-255 are bytes, 256 is the end of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))} | {"<eos>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)


def test_trace_command_records_a_synth_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("moeflow.engine")
    from moeflow.cli import main
    from moeflow.routing.trace import Trace

    config = tiny_config("olmoe", layers=3)
    config.vocab_size, config.eos_token_id = 260, 256
    model_dir = write_checkpoint(config, tmp_path / "m", progress=False)
    byte_tokenizer(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nsecond\\nprompt\n")
    out = tmp_path / "t.npz"
    args = ["trace", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--max-tokens", "4", "--device", "cpu", "--batch-size", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    trace = Trace.load(out)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (3, 5, 2)
    assert trace.requests() == [0, 1]
    # Prefill rows are the prompts' bytes ("second\nprompt": the \n is one line break); decode rows follow.
    prefill = trace.position[~trace.decode]
    assert len(prefill) == len("hello world") + len("second\nprompt")
    assert 1 <= trace.decode.sum() <= 2 * 3
    assert ((trace.experts >= 0) & (trace.experts < 5)).all()
    assert main(["trace-stats", str(out)]) == 0
