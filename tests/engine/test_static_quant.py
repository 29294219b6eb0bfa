"""Static decode with quantised experts on the CPU (the slot-table step run eagerly, its quantised projections
through the torch reference of ``moeflow::slot_linear_quant``): greedy tokens equal the eager decode with the same
``expert_dtype``, from the zero-copy host pool, through ``host_row`` with a small host pool, and compiled; the
formats and copies it cannot run are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.engine import static
from moeflow.errors import RequestError
from tests.families import build_checkpoint
from tests.test_engine import PROMPT

BATCH = [PROMPT[0], PROMPT[0][:3], [9, 8, 7, 6, 5, 4, 3]]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(BATCH, PARAMS)]


def build_biased_gpt_oss(root: Path) -> Path:
    """gpt-oss with random expert biases (transformers initialises them to zero, which would hide their path)."""
    path = build_checkpoint("gpt_oss", root / "gpt_oss")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def biased_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_biased_gpt_oss(tmp_path_factory.mktemp("biased"))


@pytest.mark.parametrize(
    ("family", "fmt"),
    [("olmoe", "int4"), ("olmoe", "fp8"), ("olmoe", "int8"), ("olmoe", "int2"), ("gpt_oss", "int4"),
     ("gpt_oss", "fp8"), ("deepseek_v3", "int4"), ("qwen3_moe", "fp8")],
)  # fmt: skip
def test_static_quantised_equals_eager(checkpoints: dict[str, Path], family: str, fmt: str) -> None:
    path = checkpoints[family]
    for slots in (2, None):
        kw = dict(device="cpu", num_slots=slots, expert_dtype=fmt, progress=False)
        want = _tokens(LLM(path, decode="eager", **kw))
        llm = LLM(path, decode="static", **kw)
        assert llm.static is not None and llm.static.table.zero_copy and llm.store.codec is not None
        assert llm.store.slots.dtype == torch.uint8
        assert _tokens(llm) == want, slots
        s = llm.store.stats
        assert s.bytes_zero_copy > 0 or slots is None
        assert (
            s.bytes_to_device
            == (s.demand_loads + s.prefetch_loads) * llm.info.expert_bytes + s.bytes_zero_copy
        )


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_static_quantised_with_biases_equals_eager(biased_gpt_oss: Path, fmt: str) -> None:
    kw = dict(device="cpu", num_slots=2, expert_dtype=fmt, progress=False)
    want = _tokens(LLM(biased_gpt_oss, decode="eager", **kw))
    assert _tokens(LLM(biased_gpt_oss, decode="static", **kw)) == want


def test_static_quantised_reads_misses_through_host_rows(biased_gpt_oss: Path) -> None:
    path = biased_gpt_oss  # transposed weights and biases
    probe = LLM(path, device="cpu", num_slots=2, expert_dtype="int4", progress=False)
    kw = dict(device="cpu", num_slots=3, expert_dtype="int4", host_memory=4 * probe.info.expert_bytes,
              progress=False)  # fmt: skip
    want = _tokens(LLM(path, decode="eager", **kw))
    llm = LLM(path, decode="static", **kw)
    assert llm.static is not None and not llm.static.table.zero_copy
    assert _tokens(llm) == want


def test_compiled_static_quantised_equals_eager(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(static, "COMPILE_BACKEND", "aot_eager")  # tracing only (see test_static_compiled)
    torch._dynamo.reset()
    path = checkpoints["olmoe"]
    kw = dict(device="cpu", num_slots=3, expert_dtype="int4", progress=False)
    want = _tokens(LLM(path, decode="eager", **kw))
    llm = LLM(path, decode="static", compile=True, **kw)
    assert _tokens(llm) == want
    assert llm.static.step != llm.static._forward and llm.store.stats.bytes_zero_copy > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(expert_dtype="int3"), "decode='static' cannot run int3 experts; it runs experts in full precision or "
                                    "fp8, int8, int4, int2, mxfp4: use decode='eager' (or auto)"),
        (dict(miss_dtype="int4"), "decode='static' cannot run a --miss-dtype int4 copy"),
    ],
)  # fmt: skip
def test_unsupported_forms_are_one_line_errors(
    checkpoints: dict[str, Path], options: dict, message: str
) -> None:
    path = checkpoints["olmoe"]
    with pytest.raises(RequestError) as err:
        LLM(path, device="cpu", num_slots=3, decode="static", progress=False, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    auto = LLM(path, device="cpu", num_slots=3, decode="auto", progress=False, **options)
    assert auto.static is None  # auto decodes eagerly instead


def test_static_native_mxfp4_equals_eager(tmp_path: Path) -> None:
    """gpt-oss's native MXFP4 experts, read as stored: the static decode (the quantised slot-table experts, misses
    read from the host rows) gives the eager decode's tokens at a small and a full pool."""
    from tests.model.test_native_quant import mxfp4_pair

    quantised, _ = mxfp4_pair(tmp_path)
    for slots in (3, None):
        kw = dict(device="cpu", num_slots=slots, progress=False)
        want = _tokens(LLM(quantised, decode="eager", **kw))
        llm = LLM(quantised, decode="static", **kw)
        assert llm.static is not None and llm.store.codec is not None and llm.store.codec.fmt.name == "mxfp4"
        assert _tokens(llm) == want, slots
        assert llm.store.stats.bytes_zero_copy > 0 or slots is None
