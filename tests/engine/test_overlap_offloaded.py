"""The offloaded overlap (``EngineConfig.overlap_offloaded``) on the CPU: with a slot pool too small for every expert,
step N+1 is launched on a plan made before step N is settled, and the step folds N's fills into the table itself.
The tokens are the serial path's; every slot the policy thinks holds an expert holds that expert's bytes, and so
does every slot the device's table points to; the simulator's "static-overlap" execution makes the engine's
decisions; rows that finish (end of sequence) and a generation stopped early leave the same invariants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.experts.plan import Boundary
from moeflow.experts.slot_experts import SlotTensors
from moeflow.sim import simulate
from tests.engine.test_overlap import PROMPTS, Logged

SLOTS = 6


def engine(path: Path, offloaded: bool, policy: Any = "lru", **kw: Any) -> LLM:
    llm = LLM(path, device="cpu", decode="static", num_slots=SLOTS, policy=policy, overlap=True,
              overlap_offloaded=offloaded, progress=False, **kw)  # fmt: skip
    assert llm.static is not None
    return llm


@pytest.fixture(autouse=True)
def checked_tables(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """At the start of every static step, once the last step's fills are folded in, each entry of the device's
    table points to a slot holding that expert's row (else the step would compute with the wrong weights; the
    outputs could still agree by chance on a tiny model). Returns, for each step checked, whether it folded in fills
    of the step before."""
    checked: list[bool] = []
    begin = SlotTensors.begin_step

    def begin_and_check(self: SlotTensors) -> None:
        folds = bool(self.fold[0]) and bool(self.taken.any())
        begin(self)
        for layer, e in torch.nonzero(self.table >= 0).tolist():
            row = self.host_row(layer, e)
            assert torch.equal(self.pool[int(self.table[layer, e])], row), (
                f"table entry {(layer, e)} is wrong"
            )
        checked.append(folds)

    monkeypatch.setattr(SlotTensors, "begin_step", begin_and_check)
    return checked


def assert_slots_hold_their_experts(llm: LLM) -> None:
    """Every key the policy places in a slot is that expert's row."""
    pool = llm.static.table.tensors.pool  # type: ignore[union-attr]
    held = [(slot, key) for slot, key in enumerate(llm.policy.key_in) if key is not None]
    assert held, "the policy holds nothing: nothing was checked"
    for slot, key in held:
        assert torch.equal(pool[slot], llm.store.host_row_of(key)), f"slot {slot} does not hold {key}"


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_offloaded_overlap_equals_serial(
    checkpoints: dict[str, Path], family: str, policy: str, checked_tables: list[bool]
) -> None:
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outs = []
    for offloaded in (False, True):
        llm = engine(checkpoints[family], offloaded, policy)
        outs.append([o.token_ids for o in llm.generate(PROMPTS, params) + llm.generate(PROMPTS[:2], params)])
        assert_slots_hold_their_experts(llm)
    assert outs[1] == outs[0]
    o = llm.overlap
    assert o is not None and o.stats.relaunched == 0
    assert (
        o.stats.kept == o.stats.launched_ahead == 2 * (10 - 2)
    )  # every decode step but each generation's last
    assert (
        llm.policy.stats.misses > 0 and llm.policy.stats.evictions > 0
    )  # offloaded: steps missed and filled
    assert len(checked_tables) == 4 * 9 and sum(checked_tables) > 0  # two engines' decode steps; some folded


class InFlight(Logged):
    """``Logged`` that also writes down what ``plan_in_flight`` returned."""

    def plan_in_flight(self, batch: int) -> Boundary:
        plan = super().plan_in_flight(batch)
        self.log.append(("in_flight", plan.candidates, [load.slot for load in plan.loads]))
        return plan


def test_plans_are_one_step_behind(checkpoints: dict[str, Path]) -> None:
    """The policy is asked for the next step's plan between ``begin_step`` and ``settle_step`` of the step before,
    and no plan offers a candidate or loads into a slot the step still running was offered."""
    llm = engine(checkpoints["olmoe"], True, InFlight())
    llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    log = llm.policy.log
    kinds = [entry[0] for entry in log]
    first = kinds.index("in_flight") - 3  # the first decode step's begin
    assert kinds[first : first + 6] == ["begin", "plan", "plan", "in_flight", "settle", "end"]
    assert kinds[first + 6 : first + 11] == ["begin", "plan", "in_flight", "settle", "end"]
    offered = [entry[3] for entry in log[first : first + 2] if entry[0] == "plan"][:1]
    offered += [entry[1] for entry in log if entry[0] == "in_flight"]
    loads = [[]] + [entry[2] for entry in log if entry[0] == "in_flight"]
    assert len(offered) == 8 - 1 and any(offered)
    for running, (planned, loaded) in zip(offered, zip(offered[1:], loads[1:])):
        assert not set(running) & (set(planned) | set(loaded)), "a slot offered to two steps that overlap"


def test_simulator_models_the_lagged_plans(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["deepseek_v3"]
    rec = LLM(path, device="cpu", record_trace=True, progress=False)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    rec.generate(PROMPTS, params)
    trace = rec.trace()
    results = {}
    for offloaded in (False, True):
        llm = engine(path, offloaded, "lru", replay=trace)
        llm.generate(PROMPTS, params, request_ids=[0, 1, 2])
        st = llm.policy.stats
        results[offloaded] = (st.hits, st.misses, st.evictions)
        sim = simulate(trace, "lru", SLOTS, len(PROMPTS), execution="static-overlap" if offloaded else "static",
                       batching="recorded")  # fmt: skip
        assert (sim.hits, sim.misses, sim.evictions) == results[offloaded]
        assert_slots_hold_their_experts(llm)
    assert llm.overlap is not None and llm.overlap.stats.kept > 0
    assert (
        results[True] != results[False]
    )  # the lag changes the decisions: the parity is not the serial one's


def test_rows_that_finish_and_a_stream_stopped_early(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    ref = engine(path, False)
    tokens = ref.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))[1].token_ids
    outs = []
    for offloaded in (False, True):
        llm = engine(path, offloaded)
        llm.eos_ids = {tokens[4]}  # the second prompt ends at its fifth token (or earlier)
        outs.append([o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12))])
        assert_slots_hold_their_experts(llm)
    assert outs[1] == outs[0] and any(len(t) < 12 for t in outs[0])
    # every row ends at the same end of sequence: the step launched after it is dropped, its candidates emptied
    llm = engine(path, True)
    llm.eos_ids = {tokens[4]}
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12))[0]
    assert out.token_ids == outs[0][1]
    assert llm.overlap is not None and llm.overlap.stats.dropped == 1
    assert_slots_hold_their_experts(llm)
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
    for _, _ in zip(range(6), stream):
        pass
    stream.close()
    assert_slots_hold_their_experts(llm)
    again = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in again] == [
        o.token_ids for o in ref.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    ]
