"""``expertflow-reuse``: request-level reuse in the victim order, bypass of fills and emptied slots at static decode
boundaries, and runs in the simulator (both executions, deterministic)."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.expertflow import ExpertFlowPolicy
from moeflow.experts.policies.reuse import ReusePolicy
from moeflow.routing.trace import Trace
from moeflow.sim import simulate
from tests.experts.policies.test_expertflow import E, K, L, TablePredictor, random_trace


def make(cls: type, slots: int, **options) -> ExpertFlowPolicy:
    """A policy with a predictor that knows nothing (flat probabilities): only frequencies rank the victims."""
    pol = cls()
    pol.bind(slots, L, E, K)
    pol.setup(PolicyContext(options={"predictor": TablePredictor({}), "min_prob": 2.0, **options}))
    return pol


def run_step(pol: ExpertFlowPolicy, rid: int, pos: int, rows: list[list[int]], prefill: bool) -> None:
    """One eager step of request ``rid``: ``rows`` [T][K] the experts of every layer of each token."""
    ex = np.array([[r] * L for r in rows])  # [T, L, K] the same experts at every layer
    pol.begin_step(StepInfo(0, (rid,), (tuple(range(len(rows))),), (pos,), prefill))
    for layer in range(L):
        pol.observe(layer, ex[:, layer], None)
        pol.request(layer, sorted({int(e) for e in ex[:, layer].ravel()}))
    pol.end_step()


def history(pol: ExpertFlowPolicy) -> None:
    """Request 0 used experts 4 and 5 for 30 tokens and ended; request 1's prompt used 0 and 1 twenty times, 4 and 5
    once."""
    for pos in range(30):
        run_step(pol, 0, pos, [[4, 5]], pos == 0)
    pol.end_request(0)
    run_step(pol, 1, 0, [[0, 1]] * 20 + [[4, 5]], True)


def test_registered() -> None:
    pol = make_policy("expertflow-reuse")
    assert isinstance(pol, ReusePolicy) and pol.name == "expertflow-reuse"


def test_keeps_the_experts_the_running_request_reuses() -> None:
    # 4 slots per layer would hold all four; 2 per layer hold (0, 1) or (4, 5). Every slot is full after history.
    for cls, keep in ((ReusePolicy, {0, 1}), (ExpertFlowPolicy, {4, 5})):
        pol = make(cls, 4 * L)
        history(pol)
        pol.begin_step(StepInfo(0, (1,), ((99,),), (21,), False))
        victims = pol.select_victims(2 * L, set(), 0)
        kept = {e for lay, e in pol.slot_of if (lay, e) not in victims}
        # request-level counts keep the prompt's experts; ExpertFlow's short running average keeps request 0's
        assert kept == keep, cls.__name__


def test_a_new_request_starts_from_the_long_run_frequency() -> None:
    pol = make(ReusePolicy, 4 * L)
    history(pol)
    q = pol.request_rates((7,))[0]  # never seen: the long-run per-token frequency of every request so far
    assert np.allclose(q, pol.long_run()) and q[0, 4] > q[0, 0] > q[0, 2] == 0.0
    q1 = pol.request_rates((1,))[0]
    assert q1[0, 0] > 0.8 and q1[0, 4] < 0.3  # request 1 itself: its own counts dominate


def test_bypass_offers_only_keys_less_likely_to_be_reused_than_the_misses() -> None:
    pol = make(ReusePolicy, 4 * L, bypass=1.0)
    history(pol)
    pol.begin_step(StepInfo(0, (1,), ((99,),), (21,), False))
    f = pol._fstep  # [L, E] step frequency of the coming step
    pol._miss_f = float((f[0, 0] + f[0, 4]) / 2)  # misses as likely as halfway between the two kinds
    offered = pol.plan_boundary(1).candidates
    keys = {pol.key_in[s] for s in offered}
    assert keys and all(e in (4, 5) for _, e in keys)  # never a slot of request 1's own experts
    pol._miss_f = float(f[0, 4]) / 2  # misses half as likely as any resident key: bypass every fill
    assert pol.plan_boundary(1).candidates == ()
    pol.bypass = 0.0  # off: the fill budget's worth of victims, in order
    assert len(pol.plan_boundary(1).candidates) == pol.fill_budget(1) > 0


def test_vacate_empties_the_best_victims_after_the_prefetches() -> None:
    pol = make(ReusePolicy, 4 * L, vacate=1.0)
    history(pol)
    pol._miss_avg = 3.0  # three misses per step lately
    pol.begin_step(StepInfo(0, (1,), ((99,),), (21,), False))
    before = dict(pol.slot_of)
    b = pol.plan_boundary(1)
    emptied = [k for k in before if k not in pol.slot_of]
    assert len(emptied) == 3 and all(e in (4, 5) for _, e in emptied)
    empty = [s for s in range(pol.num_slots) if b.resident[s] < 0]
    assert sorted(empty) == sorted(before[k] for k in emptied)
    assert set(empty) <= set(b.candidates[: len(empty)])  # the emptied slots are offered first


def test_offers_nothing_it_does_not_hold_and_keeps_accounts_in_the_simulator() -> None:
    trace = random_trace(5, 4, 12)
    for execution in ("eager", "static"):
        runs = [
            simulate(
                trace,
                "expertflow-reuse",
                L * E // 4,
                batch,
                execution=execution,
                options={"predictor": TablePredictor({}), "vacate": 0.5, "bypass": 1.0},
            )
            for batch in (1, 1, 3)
        ]
        assert runs[0].to_dict() == runs[1].to_dict()  # deterministic
        for r in runs:
            assert r.hits + r.misses == _accesses(trace, r.batch_size)
            assert r.decode_loads <= r.loads


def _accesses(trace: Trace, batch: int) -> int:
    from moeflow.sim.simulator import access_sequence

    return len(access_sequence(trace, batch, L * E // 4))


@pytest.mark.parametrize(
    "option", ["req_prior=2", "req_decay=0.9", "next_weight=1", "bypass=1", "vacate=0.5"]
)
def test_options_are_read(option: str) -> None:
    name, value = option.split("=")
    pol = make(ReusePolicy, 8, **{name: value})
    assert getattr(pol, name) == float(value)
