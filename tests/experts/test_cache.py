"""LRU and LFU bookkeeping: plans, evictions, protection of the layer's own experts, stats."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.errors import MoeflowError
from moeflow.experts.cache import CachePolicy
from moeflow.experts.plan import StepRouting
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


def _settle_key_by_key(policy: CachePolicy, routing: StepRouting) -> None:
    """``settle_step``'s meaning, one key at a time in layer then expert order: observe the layer, fill a missed
    expert into the slot it claimed (if offered), count it, touch it if resident, tell the policy."""
    offered = set(policy._offered)
    for layer in range(policy.num_layers):
        policy.observe(layer, routing.experts[layer], None)
        policy.clock += 1
        for e in np.flatnonzero(routing.served[layer]).tolist():
            key = (layer, e)
            if routing.served[layer, e] == 1:
                policy.stats.hits += 1
                if key in policy._unused_prefetch:
                    policy._unused_prefetch.discard(key)
                    policy.stats.prefetch_hits += 1
            else:
                policy.stats.misses += 1
                slot = int(routing.filled[layer, e])
                if slot in offered:
                    offered.discard(slot)
                    policy._fill(key, slot)
            if key in policy.slot_of:
                policy.touch(key)
            policy.on_access(key)
    policy._offered = []


@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_settle_step_equals_its_key_by_key_meaning(name: str) -> None:
    """Random static steps (routing, hits where resident, misses filled into offered candidates): the vectorised
    settle leaves the same residency, recency order, counters and victims as settling key by key."""

    rng = np.random.default_rng(3)
    layers, experts, top_k, slots = 4, 16, 3, 20
    a, b = make_policy(name), make_policy(name)
    for p in (a, b):
        p.bind(slots, num_layers=layers, num_experts=experts, top_k=top_k)
    for step in range(40):
        batch = int(rng.integers(1, 4))
        ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(batch)])
                        for _ in range(layers)])  # fmt: skip
        boundaries = [p.plan_boundary(batch) for p in (a, b)]
        assert boundaries[0].candidates == boundaries[1].candidates
        served = np.zeros((layers, experts), np.int8)
        filled = np.full((layers, experts), -1, np.int32)
        free = list(boundaries[0].candidates)
        for layer in range(layers):
            for e in np.unique(ids[layer]).tolist():
                served[layer, e] = 1 if a.resident((layer, e)) else 2
                if served[layer, e] == 2 and free and rng.random() < 0.8:
                    filled[layer, e] = free.pop(0)
        routing = StepRouting(ids, served, filled)
        a.settle_step(routing)
        _settle_key_by_key(b, routing)
        assert a.slot_of == b.slot_of and np.array_equal(np.argsort(a.slot_used), np.argsort(b.slot_used)), (
            step
        )
        assert (a.stats.hits, a.stats.misses, a.stats.evictions) == (
            b.stats.hits,
            b.stats.misses,
            b.stats.evictions,
        )
