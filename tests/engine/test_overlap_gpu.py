"""On a CUDA device: the overlapped graph decode (``engine/overlap.py``: step N+1 replayed before step N is read
back, its tokens taken on the device) gives the serial graph decode's tokens, policy calls and statistics, with the
step compiled and not, and on the demo model in bf16 with its routing replayed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.routing.trace import Trace
from tests.engine.test_overlap import PROMPTS, Logged, engine, run_both, stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
TRACE = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "demo-eval.npz"


@pytest.mark.parametrize(("family", "compiled"), [("olmoe", False), ("gpt_oss", False), ("qwen3_moe", True)])
def test_overlapped_graph_decode_equals_serial(
    checkpoints: dict[str, Path], family: str, compiled: bool
) -> None:
    kw = dict(device="cuda", dtype="float32", decode="graph", compile=compiled)
    serial, overlapped, llm = run_both(
        checkpoints[family], SamplingParams(max_tokens=10, ignore_eos=True), **kw
    )
    assert overlapped == serial
    assert llm.overlap is not None and llm.overlap.stats.kept > 0


def test_overlapped_graph_decode_relaunches_after_a_finish(checkpoints: dict[str, Path]) -> None:
    path, kw = checkpoints["olmoe"], dict(device="cuda", dtype="float32", decode="graph", compile=False)
    ref = engine(path, False, Logged(), **kw)
    tokens = ref.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))[1].token_ids
    serial, overlapped, llm = run_both(path, SamplingParams(max_tokens=12), eos={tokens[4]}, **kw)
    assert overlapped == serial
    assert any(len(t) < 12 for t in serial[0])  # the second prompt ended early
    assert llm.overlap is not None and llm.overlap.stats.relaunched + llm.overlap.stats.dropped > 0


def trace_prompts(trace: Trace, n: int = 4) -> tuple[list[int], list[list[int]]]:
    """The first ``n`` requests of ``trace``: their ids and the first 32 tokens of each prompt."""
    ids = [int(r) for r in trace.requests()[:n]]
    prompts = []
    for r in ids:
        rows = (trace.request == r) & ~trace.decode
        order = np.argsort(trace.position[rows])
        prompts.append(np.maximum(trace.token[rows][order], 0)[:32].tolist())
    return ids, prompts


def test_demo_model_bf16_overlapped_equals_serial_with_replay() -> None:
    trace = Trace.load(TRACE)
    ids, prompts = trace_prompts(trace)
    runs = []
    for overlap in (False, True):
        llm = engine(DEMO, overlap, Logged(), device="cuda", decode="graph", replay=trace)
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True), request_ids=ids)
        runs.append(([o.token_ids for o in outs], llm.policy.log, stats(llm)))
    assert runs[1] == runs[0]
    assert isinstance(llm, LLM) and llm.overlap is not None and llm.overlap.stats.kept > 0
