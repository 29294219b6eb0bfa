"""Continuous batching with the overlapped decode (``engine/batch.py`` through ``engine/overlap.py``) on the CPU: a
steady serving state launches the next decode step before the last one is settled, with the serial serving path's
tokens, policy calls and statistics; a request that arrives while a step is launched joins after it; an abort while
a step is launched settles it first and ends the request there; sampling that is not greedy launches nothing
ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.batch import BatchEngine
from tests.engine.test_overlap import PROMPTS, Logged, engine, stats
from tests.engine.test_overlap_offloaded import assert_slots_hold_their_experts


def serve(
    llm: LLM, params: list[SamplingParams], late: int | None = None, abort: tuple[int, int] | None = None
):
    """Serve ``PROMPTS`` (a fourth request added after ``late`` steps; request ``abort[0]`` aborted after
    ``abort[1]`` steps): each request's streamed tokens, and the engine."""
    batch = BatchEngine(llm, max_batch=4, prefill_chunk=4)
    ids = [batch.add(p, q) for p, q in zip(PROMPTS, params)]
    tokens: dict[int, list[int]] = {r: [] for r in ids}
    step = 0
    while batch.has_work:
        if step == late:
            ids.append(batch.add([4, 3, 2], SamplingParams(max_tokens=7, ignore_eos=True)))
            tokens[ids[-1]] = []
        if abort is not None and step == abort[1]:
            assert batch.abort(ids[abort[0]])
        for out in batch.step():
            tokens[out.request_id].append(out.token_id)
        step += 1
    return [tokens[r] for r in ids], batch


def both(
    path: Path, params: list[SamplingParams], eos: set[int] | None = None, **kw: Any
) -> tuple[tuple, tuple, BatchEngine]:
    """(tokens, policy log, statistics) of serving without and with the overlapped decode, and the last engine."""
    runs = []
    for overlap in (False, True):
        llm = engine(path, overlap, Logged())
        if eos is not None:
            llm.eos_ids = eos
        tokens, batch = serve(llm, params, **kw)
        runs.append((tokens, llm.policy.log, stats(llm)))
    return runs[0], runs[1], batch


def test_overlapped_serving_equals_serial(checkpoints: dict[str, Path]) -> None:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 11, 9)]  # rows finish apart
    ref = engine(checkpoints["olmoe"], False, Logged()).generate([PROMPTS[1]], params[1])[0].token_ids
    params[1] = SamplingParams(max_tokens=11)  # ends at its end of sequence, which no launch can foresee
    serial, overlapped, batch = both(checkpoints["olmoe"], params, eos={ref[7]}, late=8)
    assert overlapped == serial
    assert [len(t) for i, t in enumerate(serial[0]) if i != 1] == [6, 9, 7] and len(serial[0][1]) <= 8
    o = batch.overlap
    assert o is not None and o.stats.kept > 0  # steps were launched ahead and kept
    assert o.stats.relaunched + o.stats.dropped > 0  # and voided where a row finished
    assert batch.pending is None and not batch.running and batch.kv.free == 4


def test_every_finished_request_frees_its_row_and_equals_alone(checkpoints: dict[str, Path]) -> None:
    llm = engine(checkpoints["qwen3_moe"], True, Logged())
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 8, 12)]
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    tokens, batch = serve(llm, params)
    assert tokens == alone
    assert batch.overlap is not None and batch.overlap.stats.kept > 0


def test_an_abort_settles_the_launched_step_and_ends_the_request(checkpoints: dict[str, Path]) -> None:
    params = [SamplingParams(max_tokens=12, ignore_eos=True) for _ in PROMPTS]
    serial, overlapped, batch = both(checkpoints["olmoe"], params, abort=(1, 6))
    assert overlapped[0] == serial[0]  # the aborted request streamed as many tokens as without the overlap
    assert len(serial[0][1]) < 12 and [len(t) for i, t in enumerate(serial[0]) if i != 1] == [12, 12]
    assert batch.pending is None and batch.kv.free == 4


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_only_greedy_serving_launches_ahead(checkpoints: dict[str, Path], temperature: float) -> None:
    llm = engine(checkpoints["olmoe"], True, Logged())
    params = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=temperature, seed=3) for _ in PROMPTS]
    tokens, batch = serve(llm, params)
    assert [len(t) for t in tokens] == [8, 8, 8]
    assert batch.overlap is not None
    assert (batch.overlap.stats.launched_ahead > 0) == (temperature == 0.0)


def test_a_pool_short_of_every_expert_serves_as_the_serial_path(checkpoints: dict[str, Path]) -> None:
    """Offloaded serving (6 slots) with ``overlap_offloaded`` off: no step can be launched ahead, and the overlap's
    serial steps are the serial serving path's, misses and fills included. With it on (the default), steps are
    launched ahead on a lagged plan: the same tokens, and every slot the policy fills holds its expert."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 9, 7)]
    runs = []
    for overlap in (False, True):
        llm = engine(checkpoints["olmoe"], overlap, Logged(), slots=6, overlap_offloaded=False)
        tokens, batch = serve(llm, params)
        runs.append((tokens, llm.policy.log, stats(llm)))
    assert runs[1] == runs[0]
    assert runs[0][2][1] > 0  # misses
    assert batch.overlap is not None and batch.overlap.stats.launched_ahead == 0
    llm = engine(checkpoints["olmoe"], True, Logged(), slots=6)
    tokens, batch = serve(llm, params)
    assert tokens == runs[0][0]
    assert batch.overlap is not None and batch.overlap.stats.kept > 0
    assert_slots_hold_their_experts(llm)
