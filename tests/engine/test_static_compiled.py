"""The compiled static decode step on the CPU: ``torch.compile`` traces the whole step in one graph through the
experts' custom ops (``moeflow::route``, ``moeflow::slot_linear``) and its tokens equal transformers' for every
family. Run with the "aot_eager" backend (the same tracing and functionalisation as inductor, without generating
code, which takes a minute per model on a CPU); the GPU tests compile with inductor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.engine import static
from moeflow.errors import RequestError
from tests.families import FAMILIES
from tests.test_engine import PROMPT, greedy_ref, reference

BATCH = [PROMPT[0], PROMPT[0][:3]]


@pytest.fixture(autouse=True)
def _trace_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_step_matches_transformers(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    ref = reference(path)
    want = [greedy_ref(ref, p, 6) for p in BATCH]
    llm = LLM(
        path, device="cpu", num_slots=3, host_memory="1GiB", decode="static", compile=True, progress=False
    )
    assert llm.static is not None and llm.static.compiled and llm.static.table.zero_copy
    outs = llm.generate(BATCH, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert (
        llm.static.step != llm.static._forward
    )  # it ran compiled: a failure would have raised (compile=True)
    s = llm.store.stats
    assert s.bytes_zero_copy > 0  # misses were read from the host pool inside the compiled step


def test_compile_needs_the_whole_host_pool(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(RequestError, match="compile=True needs every expert in the host pool"):
        LLM(checkpoints["olmoe"], device="cpu", num_slots=3, decode="static", compile=True, progress=False)


def test_a_failing_compilation_falls_back_with_a_warning(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gm: torch.fx.GraphModule, inputs: list) -> None:
        raise RuntimeError("this backend compiles nothing")

    monkeypatch.setattr(static, "COMPILE_BACKEND", broken)
    path = checkpoints["olmoe"]
    want = greedy_ref(reference(path), PROMPT[0], 4)
    llm = LLM(
        path, device="cpu", num_slots=3, host_memory="1GiB", decode="static", compile=True, progress=False
    )
    llm.static.must_compile = False  # as when compiling was not asked for explicitly (graph decode's default)
    with pytest.warns(UserWarning, match="could not compile this model's decode step"):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == want and llm.static.step == llm.static._forward


def test_one_compilation_serves_every_pool_size(checkpoints: dict[str, Path]) -> None:
    from torch._dynamo.utils import counters

    path = checkpoints["mixtral"]
    want = greedy_ref(reference(path), PROMPT[0], 5)
    llm = LLM(
        path, device="cpu", num_slots=3, host_memory="1GiB", decode="static", compile=True, progress=False
    )
    graphs = []
    for slots in (3, 6, 11):
        llm.reconfigure(num_slots=slots)
        out = llm.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))[0]
        assert out.token_ids == want, slots
        graphs.append(counters["stats"]["unique_graphs"])
    assert (
        graphs[0] >= 1 and graphs[1:] == graphs[:1] * 2
    )  # the slot count changed, the compiled step did not


def test_inductor_step_serves_every_pool_size(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With inductor itself (about 40 s here): aot_eager checks no input's size, inductor's code asserts each one,
    so an input whose size follows the pool without being marked dynamic fails only there (the slot table once
    shared its storage with the candidates, and the step writes the table)."""
    monkeypatch.setattr(static, "COMPILE_BACKEND", "inductor")
    path = checkpoints["qwen3_moe"]
    want = greedy_ref(reference(path), PROMPT[0], 4)
    llm = LLM(path, device="cpu", num_slots=6, host_memory="1GiB", decode="static", compile=True,
              overlap_offloaded=True, progress=False)  # fmt: skip
    for slots in (6, 9):
        llm.reconfigure(num_slots=slots)
        out = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert out.token_ids == want, slots
