"""LRU and LFU bookkeeping: plans, evictions, protection of the layer's own experts, stats."""

from __future__ import annotations

import pytest

from moeflow.errors import MoeflowError
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.classic import LFUPolicy, LRUPolicy


def bound(policy, slots: int = 3):
    policy.bind(slots, num_layers=2, num_experts=8, top_k=2)
    return policy


def test_plan_hits_misses_and_slots() -> None:
    p = bound(LRUPolicy())
    plan = p.request(0, [1, 2])
    assert (plan.hits, plan.misses) == (0, 2)
    assert sorted(plan.slots) == [0, 1] and {ld.key for ld in plan.loads} == {(0, 1), (0, 2)}
    plan = p.request(0, [2, 3])
    assert (plan.hits, plan.misses) == (1, 1)
    assert plan.slots[0] == p.slot_of[(0, 2)] and plan.loads[0].evicted is None


def test_lru_evicts_least_recent_and_never_the_layers_own() -> None:
    p = bound(LRUPolicy())
    p.request(0, [1, 2, 3])  # full
    p.request(0, [1])  # 2 is now the oldest
    plan = p.request(1, [5])
    assert plan.loads[0].evicted == (0, 2)
    plan = p.request(1, [5, 6])
    assert [ld.evicted for ld in plan.loads] == [(0, 3)]
    p.request(0, [1])  # recency now: (1,5) oldest, then (1,6), then (0,1)
    plan = p.request(1, [8, 5])  # (1,5) is oldest but needed by this very request: (1,6) goes
    assert [ld.evicted for ld in plan.loads] == [(1, 6)]
    assert p.stats.evictions == 3


def test_lfu_evicts_least_frequent() -> None:
    p = bound(LFUPolicy())
    for _ in range(3):
        p.request(0, [1])
    p.request(0, [2])
    p.request(0, [3])
    p.request(0, [3])
    plan = p.request(1, [7])
    assert plan.loads[0].evicted == (0, 2)


def test_prefetch_accounting() -> None:
    p = bound(LRUPolicy(), slots=2)
    assert p.admit((1, 4)) is not None and p.admit((1, 4)) is None  # already resident
    p.admit((1, 5))
    plan = p.request(1, [4])
    assert plan.hits == 1 and p.stats.prefetch_hits == 1
    p.request(0, [0])  # evicts the unused prefetch of (1, 5)
    assert p.stats.prefetch_wasted == 1


def test_too_many_experts_for_the_pool() -> None:
    with pytest.raises(ValueError, match="only 3 slots"):
        bound(LRUPolicy()).request(0, [0, 1, 2, 3])


def test_unknown_policy_name() -> None:
    with pytest.raises(MoeflowError, match="unknown cache policy"):
        make_policy("nonsense")
    assert make_policy("lfu").__class__ is LFUPolicy


def test_lfu_vectorised_victims_are_least_frequent_then_least_recent() -> None:
    """Every key LFU's all-slots choice evicts has the smallest (requests, last request) among the resident keys
    it may evict (what the scalar rule ``victim`` picks, up to ties)."""
    import numpy as np

    rng = np.random.default_rng(3)
    pol = make_policy("lfu")
    pol.bind(24, 4, 16, 2)
    for _ in range(300):
        layer = int(rng.integers(4))
        needed = sorted({int(e) for e in rng.choice(16, 3, replace=False)})
        protect = {(layer, e) for e in needed}
        candidates = [k for k in pol.slot_of if k not in protect]
        short = sum(k not in pol.slot_of for k in protect) - len(pol._free)
        if short > 0:
            rank = {k: (pol._count[k], pol._last[k]) for k in candidates}
            victims = pol.select_victims(short, protect, layer)
            assert len(victims) == short
            worst_kept = min((rank[k] for k in candidates if k not in victims), default=None)
            assert worst_kept is None or all(rank[v] <= worst_kept for v in victims)
        pol.request(layer, needed)
