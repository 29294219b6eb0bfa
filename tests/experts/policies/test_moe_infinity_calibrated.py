"""MoE-Infinity's ``variant=calibrated``: chances of use from the predicted ratios, expected-distance eviction,
thresholded next-layer prefetch, the collection matched once per step; the paper variant stays the default."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.cache import PolicyContext
from moeflow.experts.policies import make_policy
from moeflow.experts.policies import moe_infinity as mi
from moeflow.experts.policies.eam_scores import distance_keep, expected_gap, use_probability
from moeflow.experts.policies.moe_infinity import MoEInfinityPolicy
from moeflow.routing.eam import EAMCollection, eam_from_experts
from moeflow.sim import simulate
from tests.experts.policies.test_moe_infinity import E, K, L, make_trace, pattern

CAL = {"variant": "calibrated"}


def test_chances_and_expected_distance() -> None:
    ratio = np.array([[0.5, 0.0], [0.25, 0.25], [0.05, 0.45]])  # [L=3, E=2]
    p = use_probability(ratio, 2, 1.0)
    assert p == pytest.approx(1 - np.exp(-2 * ratio))
    gap = expected_gap(p, 3)
    assert gap[0, 1] > 1e6 and gap[0, 0] == pytest.approx(3 * np.exp(-1) / (1 - np.exp(-1)))
    keep = distance_keep(gap, 0)  # layer 0 just ran: layer 1 is next, layer 0 a whole step away
    assert keep[1, 0] > keep[0, 0] * 0 + keep[2, 0]  # nearer turn and higher chance
    assert keep[0, 0] < 1 / (1 + 2 + gap[0, 0]) + 1e-12  # turn of layer 0 after layer 0: L - 1 = 2 layers
    assert np.all(keep > 0) and keep[0, 1] < 1e-6


def test_registered_name_and_default_stay_paper() -> None:
    assert make_policy("moe-infinity").variant == "paper"
    assert make_policy("moe-infinity-calibrated").variant == "calibrated"
    pol = make_policy("moe-infinity")
    pol.bind(8, L, E, K)
    with pytest.raises(ValueError, match="variant"):
        pol.setup(PolicyContext(options={"variant": "nope"}))


def test_prefetch_only_next_layer_above_the_threshold() -> None:
    past = pattern(0, 6)
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(past, E))
    tr = make_trace([6], past)
    opts = {"eamc": eamc, **CAL}
    off = simulate(tr, "moe-infinity", 2 * K, options={**opts, "min_prob": 2.0})
    on = simulate(tr, "moe-infinity", 2 * K, options=opts)
    assert off.prefetches == 0
    # from the second step (matched at its start) the repeated routing is predicted with chance
    # 1 − exp(−1.1 · 2 · 0.5) ≈ 0.67 ≥ 0.15: each layer's experts are prefetched after the layer before
    assert on.prefetch_hits >= 4 * (L - 1) * K and on.prefetch_wasted == 0
    assert on.misses < off.misses


def test_lookahead_bounds_the_layers_prefetched() -> None:
    pol = make_policy("moe-infinity-calibrated")
    assert isinstance(pol, MoEInfinityPolicy)
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 4), E))
    pol.bind(2 * K, L, E, K)
    pol.setup(PolicyContext(options={"eamc": eamc, "lookahead": 2, "per_request": 8, "min_prob": 2.0}))
    from moeflow.experts.cache import StepInfo

    for step in range(2):
        pol.begin_step(StepInfo(step, (0,), ((1,),), (step,), False))
        if step == 1:
            pol.min_prob = 0.15
        loads = pol.prefetch(-1)
        if step == 1:  # before the step: layers 0 and 1 only, the likeliest first
            assert loads and {ld.key[0] for ld in loads} <= {0, 1}
            return
        pol.observe(0, pattern(0, 1)[:, 0])
        pol.request(0, [0, 1])
        for layer in range(1, L):
            pol.observe(layer, pattern(0, 1)[:, layer])
            pol.request(layer, sorted(int(e) for e in pattern(0, 1)[0, layer]))
        pol.end_step()


def test_eviction_drops_the_expert_expected_last_not_the_least_recent() -> None:
    pol = make_policy("moe-infinity-calibrated")
    pol.bind(2, 1, 4, 1)
    pol.setup(PolicyContext(options={"min_prob": 2.0}))
    from moeflow.experts.cache import StepInfo

    for step, e in enumerate(
        [0, 0, 0, 1, 2]
    ):  # expert 0 routed often but longest ago, expert 1 once, recently
        pol.begin_step(StepInfo(step, (0,), ((1,),), (step,), False))
        pol.observe(0, np.array([[e]]))
        plan = pol.request(0, [e])
        pol.end_step()
    evicted = [ld.evicted for ld in plan.loads]
    assert evicted == [(0, 1)]  # LRU would drop (0, 0)


def test_the_collection_is_matched_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = mi.match_eams

    def counted(*args: object) -> np.ndarray:
        calls.append(args[2])
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(mi, "match_eams", counted)
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 4), E))
    tr = make_trace([5], pattern(0, 5))
    simulate(tr, "moe-infinity", L * K, options={"eamc": eamc, **CAL})
    assert calls == [L - 1] * 4  # steps 2..5 (the first has no earlier token), over every row
    calls.clear()
    simulate(tr, "moe-infinity", L * K, options={"eamc": eamc})
    assert len(calls) > 4 * L  # the paper variant matches after every layer
