"""Quantised experts (``expert_dtype``): the engine's outputs equal those of the transformers model whose experts
were replaced by their dequantised values, for every cache size; rows are smaller; bad settings are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.config import EngineConfig
from moeflow.errors import ConfigError
from moeflow.model.layout import ExpertLayout
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import RowCodec
from tests.cli.helpers import one_error_line, run

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]


def dequantised_reference(path: Path, layers: list, layout: ExpertLayout, fmt: str) -> torch.nn.Module:
    """transformers' model with every expert written back as its ``fmt`` round trip."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layer in layers:
        module = ref.get_submodule(layer.path)
        codec = RowCodec(layout, FORMATS[fmt], bool(getattr(module, "is_transposed", False)))
        params = {p.name: getattr(module, p.name) for p in layout.params}
        with torch.no_grad():
            for e in range(next(iter(params.values())).shape[0]):
                flat = torch.cat([params[p.name][e].reshape(-1) for p in layout.params])
                back = codec.decode(codec.encode(flat)[None], torch.float32)[0]
                for p in layout.params:
                    params[p.name][e].copy_(back[p.offset : p.offset + p.numel].view(p.shape))
    return ref


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("fmt", ["int4", "fp8", "int2"])
def test_outputs_equal_the_model_with_dequantised_experts(
    checkpoints: dict[str, Path], family: str, fmt: str
) -> None:
    path = checkpoints[family]
    full = LLM(path, device="cpu", num_slots=2, progress=False)
    want_tokens = None
    for slots in (2, None):
        llm = LLM(path, device="cpu", num_slots=slots, progress=False, expert_dtype=fmt)
        total = llm.info.num_layers * llm.info.num_experts
        assert llm.store.host.shape[0] == total  # quantised once, at load, into the host pool
        assert llm.info.expert_bytes < full.info.expert_bytes
        if want_tokens is None:
            ref = dequantised_reference(path, llm.loaded.layers, llm.loaded.layout, fmt)
            with torch.no_grad():
                want_logits = ref(torch.tensor(PROMPT)).logits
            out = ref.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)  # fmt: skip
            want_tokens = out[0, len(PROMPT[0]) :].tolist()
        got = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert got.token_ids == want_tokens
        assert got.stats.bytes_to_device == got.stats.misses * llm.info.expert_bytes
        with torch.no_grad():
            logits = llm.loaded.model(torch.tensor(PROMPT)).logits
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)


def test_bf16_keeps_experts_exact(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    a = LLM(path, device="cpu", num_slots=3, progress=False, expert_dtype="bf16")
    b = LLM(path, device="cpu", num_slots=3, progress=False)
    assert a.info.expert_bytes == b.info.expert_bytes and a.store.codec is None
    with torch.no_grad():
        assert torch.equal(
            a.loaded.model(torch.tensor(PROMPT)).logits, b.loaded.model(torch.tensor(PROMPT)).logits
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(expert_dtype="int5"),
            "unknown expert_dtype 'int5' (--expert-dtype): use one of auto, bf16, fp8",
        ),
        (dict(miss_dtype="q4"), "unknown miss_dtype 'q4' (--miss-dtype)"),
        (dict(expert_dtype="int4", miss_dtype="int4"), "use expert_dtype bf16 with a miss_dtype"),
    ],
)
def test_bad_settings_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**options)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--expert-dtype", "int5"], "argument --expert-dtype: invalid choice: 'int5'"),
        (["--expert-dtype", "int4", "--miss-dtype", "int4"], "use expert_dtype bf16 with a miss_dtype"),
        (["--expert-dtype", "int3", "--decode", "static"], "cannot run int3 experts; it runs experts in"),
    ],
)
def test_cli_refuses_bad_expert_dtypes(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["generate", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--prompt", "hi", *flags]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in one_error_line(err)
