"""MoE-Infinity policy: EAM tracking per request, matching on executed layers, proximity-ordered prefetch,
early-layer-biased eviction, online growth and loading of the collection."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.errors import MoeflowError
from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.moe_infinity import EAMC_FILE, MoEInfinityPolicy
from moeflow.routing.eam import EAMCollection, eam_from_experts
from moeflow.routing.trace import Trace
from moeflow.sim import simulate

L, E, K = 6, 8, 2


def make_trace(lengths: list[int], experts: np.ndarray) -> Trace:
    req = np.concatenate([np.full(n, r) for r, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    n = len(req)
    return Trace("test", E, K, req, pos, np.ones(n, bool), np.arange(n), np.full(n, -1), experts,
                 np.ones(experts.shape, np.float32))  # fmt: skip


def pattern(shift: int, tokens: int) -> np.ndarray:
    """[tokens, L, K]: layer l always routes to experts (l + shift) % E and (l + shift + 1) % E."""
    row = np.array([[(i + shift) % E, (i + shift + 1) % E] for i in range(L)])
    return np.broadcast_to(row, (tokens, L, K)).copy()


def bound(slots: int = 16, **opts) -> MoEInfinityPolicy:
    pol = make_policy("moe-infinity")
    assert isinstance(pol, MoEInfinityPolicy)
    pol.bind(slots, L, E, K)
    pol.setup(PolicyContext(options=opts))
    return pol


def test_a_repeated_request_is_matched_and_prefetched_fully() -> None:
    past = pattern(0, 5)
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(3, 5), E))  # a different request
    eamc.add(eam_from_experts(past, E))
    res = simulate(make_trace([1], past[:1]), "moe-infinity", L * K, options={"eamc": eamc})
    assert res.misses == K  # only layer 0, which nothing precedes
    assert res.prefetches == (L - 1) * K and res.prefetch_wasted == 0
    assert res.hit_ratio == pytest.approx(1 - 1 / L)


def test_without_a_collection_nothing_is_prefetched() -> None:
    res = simulate(make_trace([1], pattern(0, 1)), "moe-infinity", L * K)
    assert res.prefetches == 0 and res.misses == L * K


def test_matching_follows_the_executed_layers_not_the_ones_ahead() -> None:
    a, b = pattern(0, 4), pattern(4, 4)
    query = a.copy()
    query[:, 2:] = b[:, 2:]  # a request like a on layers 0..1 and like b on layers 2..5
    eamc = EAMCollection(L, E)
    eamc.extend([eam_from_experts(a, E), eam_from_experts(b, E)])
    pol = bound(slots=L * E, eamc=eamc, max_prefetch=K, prefetch=0)
    pol.begin_step(StepInfo(0, (9,), ((1, 2, 3, 4),), (0,), True))  # prefill: every layer seen once
    for layer in range(L):
        pol.observe(layer, query[:, layer])
        pol.request(layer, sorted(set(query[:, layer].ravel().tolist())))
    pol.prefetch_enabled = True
    pol.begin_step(StepInfo(1, (9,), ((5,),), (4,), False))
    for layer in range(2):
        pol.observe(layer, query[:1, layer])
        pol.request(layer, sorted(set(query[0, layer].tolist())))
    loads = pol.prefetch(1)
    # rows 0..1 look like a, so a's layer-2 experts are predicted; over all rows b would match (4 rows of 6)
    assert {ld.key for ld in loads} == {(2, e) for e in a[0, 2]}
    assert pol.eamc.nearest(pol.eamc.similarity(pol.running[9].counts, L - 1)).tolist() == [1]


def test_prefetch_priority_decays_with_distance_and_skips_passed_layers() -> None:
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 3), E))
    pol = bound(slots=L * E, eamc=eamc, max_prefetch=100)
    pol.begin_step(StepInfo(0, (1,), ((1,),), (0,), False))
    for layer in range(3):
        pol.observe(layer, pattern(0, 1)[:, layer])
        pol.request(layer, pattern(0, 1)[0, layer].tolist())
    loads = pol.prefetch(2)
    assert loads and all(ld.prefetch and ld.key[0] > 2 for ld in loads)
    pri = [ld.priority for ld in loads]
    assert pri == sorted(pri, reverse=True)
    by_layer = {ld.key[0]: ld.priority for ld in loads}
    assert by_layer[3] == pytest.approx(0.5 * (1 - 1 / L)) and by_layer[5] == pytest.approx(0.5 * (1 - 3 / L))
    assert pol.prefetch(1) == []  # a layer already passed: stale, nothing


def test_prefetch_is_bounded_per_call() -> None:
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 3), E))
    pol = bound(slots=L * E, eamc=eamc, max_prefetch=3)
    pol.begin_step(StepInfo(0, (1,), ((1,),), (0,), False))
    pol.observe(0, pattern(0, 1)[:, 0])
    pol.request(0, [0, 1])
    assert len(pol.prefetch(0)) == 3


def test_eviction_prefers_late_layers_and_unpredicted_experts() -> None:
    pol = bound(slots=4)
    pol.begin_step(StepInfo(0, (1,), ((1,),), (0,), False))
    for layer in (0, L - 1):  # the same activation share in an early and a late layer
        pol.observe(layer, np.array([[2, 3]]))
    pol.request(0, [2])
    pol.request(L - 1, [2])
    assert pol.victim([(0, 2), (L - 1, 2)], L - 1) == (L - 1, 2)  # early layers are kept
    assert pol.victim([(0, 2), (0, 5)], L - 1) == (0, 5)  # used in this request beats never used


def test_eviction_falls_back_to_lru_when_nothing_is_known() -> None:
    pol = bound(slots=3)
    for e in (4, 1, 6):
        pol.request(2, [e])
    pol.request(2, [4])
    assert pol.victim([(2, 4), (2, 1), (2, 6)], 2) == (2, 1)


def test_observe_splits_rows_by_sequence_and_end_request_grows_the_collection() -> None:
    pol = bound()
    pol.begin_step(StepInfo(0, (10, 11), ((1, 2, 3), (4,)), (0, 0), True))
    pol.observe(0, np.array([[0, 1], [0, 2], [0, 3], [5, 6]]))
    assert pol.running[10].counts[0].tolist() == [3, 1, 1, 1, 0, 0, 0, 0]
    assert pol.running[11].counts[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
    pol.end_request(10)
    assert len(pol.eamc) == 0 and 10 not in pol.running  # admitted when the next step starts, not mid-step
    pol.begin_step(StepInfo(1, (11,), ((5,),), (1,), False))
    assert len(pol.eamc) == 1 and pol.eamc.entries[0, 0, 0] == 3
    pol.finish()
    assert len(pol.eamc) == 2 and not pol.running


def test_simulator_runs_do_not_leak_into_the_given_collection() -> None:
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 2), E))
    simulate(make_trace([3, 3], np.concatenate([pattern(1, 3), pattern(2, 3)])), "moe-infinity", 8,
             options={"eamc": eamc})  # fmt: skip
    assert len(eamc) == 1


def test_setup_loads_from_option_path_or_model_dir_and_saves(tmp_path) -> None:
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 2), E))
    eamc.save(tmp_path / "given.npz")
    pol = bound(eamc=str(tmp_path / "given.npz"), eamc_save=str(tmp_path / "out.npz"))
    assert len(pol.eamc) == 1
    pol.begin_step(StepInfo(0, (1,), ((1,),), (0,), False))
    pol.observe(0, np.array([[3, 4]]))
    pol.finish()
    assert len(EAMCollection.load(tmp_path / "out.npz", L, E)) == 2

    model = tmp_path / "model"
    eamc.save(model / EAMC_FILE)
    pol = make_policy("moe-infinity")
    pol.bind(8, L, E, K)
    pol.setup(PolicyContext(model_dir=str(model)))
    before = (model / EAMC_FILE).read_bytes()
    pol.observe(0, np.array([[3, 4]]))
    pol.finish()
    assert len(pol.eamc) == 2 and pol.save_path is None  # learnt in memory, the shipped file left as it was
    assert (model / EAMC_FILE).read_bytes() == before

    with pytest.raises(MoeflowError, match="does not exist"):
        bound(eamc=str(tmp_path / "absent.npz"))
    with pytest.raises(MoeflowError, match="layers"):
        bound(eamc=EAMCollection(L + 1, E))


def test_corrupt_collection_beside_the_model_warns_and_starts_empty(tmp_path) -> None:
    (tmp_path / EAMC_FILE).parent.mkdir(parents=True)
    (tmp_path / EAMC_FILE).write_bytes(b"garbage")
    pol = make_policy("moe-infinity")
    pol.bind(8, L, E, K)
    with pytest.warns(UserWarning, match="unreadable"):
        pol.setup(PolicyContext(model_dir=str(tmp_path)))
    assert len(pol.eamc) == 0


def run_step(pol: MoEInfinityPolicy, step: int, rid: int, routing: np.ndarray, prefetch: bool = True) -> list:
    """Drive one decode step of request ``rid`` (``routing`` [1, L, K]); returns each ``prefetch`` call's loads."""
    pol.begin_step(StepInfo(step, (rid,), ((step,),), (step,), False))
    calls = [pol.prefetch(-1)] if prefetch else []
    for layer in range(L):
        pol.observe(layer, routing[:, layer])
        pol.request(layer, sorted(set(routing[0, layer].tolist())))
        if prefetch:
            calls.append(pol.prefetch(layer))
    pol.end_step()
    return calls


def test_prefetch_budget_caps_loads_per_step_spread_over_the_calls_left() -> None:
    eamc = EAMCollection(L, E)
    eamc.add(eam_from_experts(pattern(0, 3), E))
    pol = bound(slots=L * E, eamc=eamc, max_prefetch=100, prefetch_per_layer=0.5)  # 3 loads a step
    calls = run_step(pol, 0, 1, pattern(0, 1))
    assert [len(c) for c in calls] == [0, 1, 1, 1, 0, 0, 0]  # new request: nothing before layer 0
    assert [ld.key[0] for c in calls for ld in c] == [1, 2, 3]  # the nearest layer ahead first
    unbounded = bound(slots=L * E, eamc=eamc, max_prefetch=100)
    assert sum(len(c) for c in run_step(unbounded, 0, 1, pattern(0, 1))) == (L - 1) * K


def test_a_running_request_prefetches_layer_zero_before_its_next_step() -> None:
    eamc = EAMCollection(L, E)
    eamc.extend([eam_from_experts(pattern(4, 5), E), eam_from_experts(pattern(0, 5), E)])
    pol = bound(slots=K, eamc=eamc)  # only one layer's experts fit: layer 0's are gone by the step's end
    run_step(pol, 0, 1, pattern(0, 1))
    pol.begin_step(StepInfo(1, (1,), ((1,),), (1,), False))
    first = pol.prefetch(-1)
    assert {ld.key for ld in first} == {(0, 0), (0, 1)} and all(ld.prefetch for ld in first)
    pol.observe(0, pattern(0, 1)[:, 0])
    assert pol.request(0, [0, 1]).hits == K
    pol.end_step()
    assert run_step(pol, 2, 7, pattern(0, 1))[0] == []  # a new request: nothing routed to match yet
    off = bound(slots=K, eamc=eamc, prefetch_before=0)
    run_step(off, 0, 1, pattern(0, 1))
    assert run_step(off, 1, 1, pattern(0, 1))[0] == []


def test_own_activation_ratios_weight_recent_tokens_by_recency() -> None:
    a, b = pattern(0, 1), pattern(4, 1)
    scores = {}
    for recency, weight in ((1.0, 0.0), (0.5, 1.0)):
        eamc = EAMCollection(L, E)
        eamc.extend([eam_from_experts(pattern(0, 4), E), eam_from_experts(pattern(4, 4), E)])
        pol = bound(slots=L * E, eamc=eamc, recency=recency, recent_weight=weight, history_weight=1.0)
        for step, routing in enumerate((a, a, a, b)):
            run_step(pol, step, 1, routing, prefetch=False)
        pol.begin_step(StepInfo(4, (1,), ((4,),), (4,), False))
        scores[recency] = pol.keep_score((0, 4)) - pol.keep_score((0, 0))  # b's layer-0 expert minus a's
    assert scores[1.0] < 0 < scores[0.5]  # counts: a routed 3 times of 4; decayed: b was routed last
