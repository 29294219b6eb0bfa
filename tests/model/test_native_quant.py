"""Checkpoints that ship quantised experts load as stored and are dequantised on compute: gpt-oss MXFP4
(``*_blocks`` / ``*_scales``) and DeepSeek-V3-style block-scaled FP8 (``weight_scale_inv`` per 128 x 128 block).
Outputs equal transformers' model with the dequantised weights written in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.quant import fit
from tests.families import COMMON, FAMILIES, build_checkpoint, build_tokenizer

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]


def _rewrite(src: Path, out: Path, tensors: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if quantization is not None:
        config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config))
    build_tokenizer().save_pretrained(out)
    return out


def mxfp4_pair(root: Path) -> tuple[Path, Path]:
    """A gpt-oss checkpoint in MXFP4 (as OpenAI ships it) and the same model with its experts dequantised."""
    kw = {**FAMILIES["gpt_oss"], "intermediate_size": 32}  # MXFP4 blocks need input sizes divisible by 32
    config = AutoConfig.for_model(
        "gpt_oss", **COMMON, **kw, num_key_value_heads=2, eos_token_id=0, pad_token_id=0
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 1.0)
    model.save_pretrained(root / "float")
    tensors = load_file(str(root / "float" / "model.safetensors"))
    packed, dequantised = {}, {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = value.transpose(1, 2).contiguous()  # [E, out, in], as the blocks are stored
            blocks, scales = zip(*(fit.fit_mxfp4(w[e]) for e in range(w.shape[0])), strict=True)
            b, s = torch.stack(blocks), torch.stack(scales)
            packed[f"{key}_blocks"] = b.view(*s.shape, 16)
            packed[f"{key}_scales"] = s
            dequantised[key] = fit.dequant_mxfp4(b, s).transpose(1, 2).contiguous()
        else:
            packed[key] = dequantised[key] = value
    q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}  # fmt: skip
    return (_rewrite(root / "float", root / "mxfp4", packed, q),
            _rewrite(root / "float", root / "dequantised", dequantised, None))  # fmt: skip


def fp8_pair(root: Path) -> tuple[Path, Path]:
    """A DeepSeek-V3 checkpoint with every linear weight in e4m3 and 128 x 128 block scales, and its dequantised
    twin (routers, norms, embeddings and the head stay full precision, as DeepSeek ships them)."""
    src = build_checkpoint("deepseek_v3", root / "float")
    tensors = load_file(str(src / "model.safetensors"))
    packed, dequantised = {}, {}
    for key, value in tensors.items():
        linear = key.endswith(".weight") and value.dim() == 2 and "layernorm" not in key
        if not linear or "embed_tokens" in key or "lm_head" in key or key.endswith("mlp.gate.weight"):
            packed[key] = dequantised[key] = value
            continue
        n, d = value.shape
        gn, gd = -(-n // 128), -(-d // 128)
        blocks = torch.nn.functional.pad(value.abs(), (0, gd * 128 - d, 0, gn * 128 - n)).view(
            gn, 128, gd, 128
        )
        scale = (blocks.amax(dim=(1, 3)) / 448).clamp_min(1e-12)
        full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :d]
        codes = (value / full).to(torch.float8_e4m3fn)
        packed[key], packed[f"{key}_scale_inv"] = codes, scale
        dequantised[key] = codes.to(torch.float32) * full
    q = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    return _rewrite(src, root / "fp8", packed, q), _rewrite(src, root / "dequantised", dequantised, None)


@pytest.mark.parametrize("kind", ["mxfp4", "fp8"])
def test_native_checkpoint_loads_as_stored_and_generates(tmp_path: Path, kind: str) -> None:
    quantised, dequantised = (mxfp4_pair if kind == "mxfp4" else fp8_pair)(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(dequantised, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(PROMPT)).logits
    out = ref.generate(
        torch.tensor(PROMPT), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    want_tokens = out[0, len(PROMPT[0]) :].tolist()
    for expert_dtype in ("auto", "bf16"):  # as stored (dequantised on compute), or dequantised once at load
        llm = LLM(quantised, device="cpu", num_slots=3, progress=False, expert_dtype=expert_dtype)
        assert llm.loaded.stored is not None and llm.loaded.stored.kind == kind
        full_bytes = llm.loaded.layout.numel * 4
        assert (llm.info.expert_bytes < full_bytes / 3) == (expert_dtype == "auto")
        got = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert got.token_ids == want_tokens
        assert got.stats.bytes_from_disk > 0
        with torch.no_grad():
            logits = llm.loaded.model(torch.tensor(PROMPT)).logits
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_native_checkpoint_with_full_precision_hits_and_int4_misses(tmp_path: Path) -> None:
    quantised, _ = mxfp4_pair(tmp_path)
    llm = LLM(quantised, device="cpu", num_slots=3, progress=False, expert_dtype="bf16", miss_dtype="int4")
    assert llm.store.codec is None and llm.store.low is not None
    assert len(llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
