"""The overlapped static decode (``engine/overlap.py``) on the CPU: step N+1 launched before step N is settled gives
the serial path's tokens, policy calls and statistics, step for step; a row that finishes or a plan that changes the
table makes the launched step void and it runs again; a pool too small to hold every expert (with
``overlap_offloaded`` off), or sampling that is not greedy, launches nothing ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeflow import LLM, SamplingParams
from moeflow.experts.boundary import fill_pool
from moeflow.experts.plan import Boundary, StepRouting
from moeflow.experts.policies.classic import LRUPolicy
from tests.test_engine import PROMPT

PROMPTS = [PROMPT[0] * 2, PROMPT[0][:3], [9, 8, 7, 6, 5]]


class Logged(LRUPolicy):
    """LRU that writes down every call the engine makes between steps, with what it passed and got."""

    def __init__(self, evict_at: int | None = None):
        super().__init__()
        self.log: list[tuple[Any, ...]] = []
        self.evict_at = evict_at
        """The plan of this step (its index) empties one slot first (a plan that changes the table)."""
        self._step = -1

    def begin_step(self, info: Any) -> None:
        self._step = info.step
        self.log.append(("begin", info))
        super().begin_step(info)

    def plan_boundary(self, batch: int) -> Boundary:
        if self._step == self.evict_at and self.key_in[0] is not None:
            self._free.append(self._vacate(self.key_in[0]))
        plan = super().plan_boundary(batch)
        self.log.append(
            ("plan", batch, [ld.key for ld in plan.loads], plan.candidates, plan.resident.tolist())
        )
        return plan

    def settle_step(self, routing: StepRouting) -> None:
        self.log.append(
            ("settle", routing.experts.tolist(), routing.served.tolist(), routing.filled.tolist())
        )
        super().settle_step(routing)

    def end_step(self) -> None:
        self.log.append(("end",))
        super().end_step()

    def end_request(self, request_id: int) -> None:
        self.log.append(("end_request", request_id))
        super().end_request(request_id)


def engine(path: Path, overlap: bool, policy: LRUPolicy, slots: int | None = None, **kw: Any) -> LLM:
    kw = {"device": "cpu", "decode": "static", **kw}
    llm = LLM(path, num_slots=slots, policy=policy, overlap=overlap, progress=False, **kw)
    assert llm.static is not None
    fill = fill_pool(llm.policy)  # what the overlapped engine does at its first decode step, here for both
    if fill is not None:
        llm.static.table.apply(fill)
    return llm


def stats(llm: LLM) -> tuple:
    p, s = llm.policy.stats, llm.store.stats
    return p.hits, p.misses, p.prefetches, p.evictions, s.bytes_to_device, s.bytes_zero_copy


def run_both(
    path: Path, params: SamplingParams, eos: set[int] | None = None, evict_at: int | None = None, **kw: Any
) -> tuple[tuple, tuple, LLM]:
    """(tokens, policy log, statistics) of the serial engine and the overlapped one, on two generations."""
    runs = []
    for overlap in (False, True):
        llm = engine(path, overlap, Logged(evict_at), **kw)
        if eos is not None:
            llm.eos_ids = eos
        outs = llm.generate(PROMPTS, params) + llm.generate(PROMPTS[:2], params)
        runs.append(([o.token_ids for o in outs], llm.policy.log, stats(llm)))
    return runs[0], runs[1], llm


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "qwen3_moe"])
def test_overlap_equals_serial(checkpoints: dict[str, Path], family: str) -> None:
    serial, overlapped, llm = run_both(checkpoints[family], SamplingParams(max_tokens=10, ignore_eos=True))
    assert overlapped == serial
    o = llm.overlap
    assert o is not None and o.stats.kept > 0 and o.stats.relaunched == 0
    # two generations of 10 tokens: every decode step but each generation's last was launched ahead
    assert o.stats.launched_ahead == 2 * (10 - 2)


def test_a_row_that_finishes_voids_the_step_launched_ahead(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    ref = engine(path, False, Logged())
    tokens = ref.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))[1].token_ids
    eos = {tokens[4]}  # the second prompt ends at its fifth token (or earlier), the others maybe not
    serial, overlapped, llm = run_both(path, SamplingParams(max_tokens=12), eos=eos)
    assert overlapped == serial
    assert any(len(t) < 12 for t in serial[0])
    assert llm.overlap is not None and llm.overlap.stats.relaunched + llm.overlap.stats.dropped > 0


def test_a_plan_that_changes_the_table_voids_the_step_launched_ahead(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    # (overlap_offloaded would go on launching ahead on lagged plans once the table stops holding every expert)
    serial, overlapped, llm = run_both(path, params, evict_at=4, overlap_offloaded=False)
    assert overlapped == serial
    assert llm.overlap is not None and llm.overlap.stats.relaunched == 1
    assert (
        llm.policy.stats.evictions == 1 and llm.policy.stats.misses > 0
    )  # the emptied slot's expert missed after


def test_overlap_with_replayed_routing(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["deepseek_v3"]
    rec = LLM(path, device="cpu", record_trace=True, progress=False)
    rec.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    runs = []
    for overlap in (False, True):
        llm = engine(path, overlap, Logged(), replay=rec.trace())
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True), request_ids=[0, 1, 2])
        runs.append(([o.token_ids for o in outs], llm.policy.log, stats(llm)))
    assert runs[1] == runs[0]
    assert llm.overlap is not None and llm.overlap.stats.kept > 0


def test_nothing_is_launched_ahead_when_a_step_can_miss_or_samples(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    # (an offloaded pool with overlap_offloaded launches ahead on a lagged plan: test_overlap_offloaded.py)
    small = [engine(path, overlap, Logged(), slots=5, overlap_offloaded=False) for overlap in (False, True)]
    outs = [llm.generate(PROMPTS, greedy) for llm in small]
    assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]
    assert small[1].policy.log == small[0].policy.log and stats(small[1]) == stats(small[0])
    assert small[1].overlap is not None and small[1].overlap.stats.launched_ahead == 0
    sampled = engine(path, True, Logged())
    sampled.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True))
    assert sampled.overlap is not None and sampled.overlap.stats.launched_ahead == 0


def test_a_stream_stopped_early_settles_the_step_launched_ahead(checkpoints: dict[str, Path]) -> None:
    llm = engine(checkpoints["olmoe"], True, Logged())
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
    for _, _ in zip(range(6), stream):
        pass
    stream.close()
    assert llm.overlap is not None and llm.overlap.stats.kept > 0
    kinds = [entry[0] for entry in llm.policy.log]
    assert (
        kinds.count("begin") == kinds.count("end") == kinds.count("settle") + 1
    )  # the eager prefill settles none
    assert kinds[-2:] == ["settle", "end"]
    served = np.asarray(llm.policy.log[-2][2])  # the last settled step: every routed expert a hit
    assert (served != 2).all() and (served == 1).any()
