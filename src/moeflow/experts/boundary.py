"""A cache policy's decisions between static decode steps (pure NumPy, no CUDA): what a step the device ran did to
residency (``settle``: fills placed, recency, hits and misses, the policy's own hooks), and what the coming step may
do (``plan``: prefetches and the candidate slots for read-through fills). ``CachePolicy.settle_step`` and
``plan_boundary`` call these; a policy overrides those methods, not these functions.
Keys are l*E+e in the arrays the device returns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.plan import Boundary, StepRouting

if TYPE_CHECKING:
    from moeflow.experts.cache import CachePolicy


def settle(policy: CachePolicy, routing: StepRouting, hooks: bool) -> None:
    """Learn the step's routing layer by layer as ``request`` would (``observe``, ``on_access``, recency), count hits
    and misses as the device served them, and place the missed experts the kernel wrote into candidate slots
    (evicting what those held).

    A filled slot's old key was not used in the step (the claim rule), so the fills can go first and the recency of
    every used key after, in one pass; ``hooks`` False (the policy has no ``observe``/``on_access`` of its own, e.g.
    LRU) skips the per-layer loop."""
    p = policy
    served, num_experts = routing.served, p.num_experts
    used = np.flatnonzero(served.reshape(-1))  # keys l*E+e in layer, then expert order
    missed = used[served.reshape(-1)[used] == 2]
    offered = set(p._offered)
    for k in missed.tolist():
        slot = int(routing.filled.reshape(-1)[k])
        if slot in offered:
            offered.discard(slot)
            p._fill((k // num_experts, k % num_experts), slot)
    if p._unused_prefetch:
        for k in used[served.reshape(-1)[used] == 1].tolist():
            key = (k // num_experts, k % num_experts)
            if key in p._unused_prefetch:
                p._unused_prefetch.discard(key)
                p.stats.prefetch_hits += 1
    touch_keys(p, used)
    if hooks:
        for layer in range(p.num_layers):
            p.observe(layer, routing.experts[layer], None)
            p.clock += 1
            for e in np.flatnonzero(served[layer]).tolist():
                p.on_access((layer, e))
    else:
        p.clock += p.num_layers
    misses = len(missed)
    p.stats.hits += len(used) - misses
    p.stats.misses += misses
    p._miss_avg = misses if p._miss_avg is None else 0.8 * p._miss_avg + 0.2 * misses
    p._offered, p._queued = p._queued or [], None  # a step planned in flight is the next one settled


def touch_keys(policy: CachePolicy, keys: np.ndarray) -> None:
    """``touch`` every resident key of ``keys`` (l*E+e), in order."""
    p = policy
    placed = p.slot_layer >= 0
    slot_of = np.full(p.num_layers * p.num_experts, -1, np.int64)
    slot_of[p.slot_layer[placed] * p.num_experts + p.slot_expert[placed]] = np.flatnonzero(placed)
    slots = slot_of[keys]
    slots = slots[slots >= 0]
    p.slot_used[slots] = p._ticks + 1 + np.arange(len(slots))
    p._ticks += len(slots)


def plan(policy: CachePolicy, batch: int) -> Boundary:
    """The coming step's prefetches (``prefetch_next_step``) and the candidate slots for its read-through fills
    (``fill_budget`` of them: free slots, then victims in the policy's eviction order; nothing is evicted until the
    device claims it)."""
    p = policy
    loads = tuple(p.prefetch_next_step())
    n = p.fill_budget(batch)
    if p.num_slots >= p.num_layers * p.num_experts:  # the free slots can hold every miss: no victims
        n = min(n, len(p._free))
    free = p._free[::-1][:n]
    protect = {load.key for load in loads}
    victims = p.select_victims(n - len(free), protect, 0) if n > len(free) else []
    p._offered = free + [p.slot_of[key] for key in victims]
    return Boundary(loads, tuple(p._offered), residency(p))


def plan_in_flight(policy: CachePolicy, batch: int) -> Boundary:
    """``plan_boundary`` for step N+1 while step N runs unsettled (planned after ``begin_step`` of N, so one step
    behind): N's candidate slots are left alone, since the device may be writing a fill into any of them. None is
    offered again, and a prefetch the plan puts into one is cancelled (``cancel``: the slot is left empty). The
    plan's own candidates wait until N is settled (``settle`` then takes them as the offered slots of N+1).

    Every other entry of the plan holds whatever N fills: N's fills are missed experts (not resident in the plan)
    in N's candidate slots, which the plan neither offers nor loads into; the step folds them into the table on
    the device (``SlotTensors.begin_step``) and ``settle`` of N places them for the policy."""
    p = policy
    running = p._offered
    held = set(running)
    plan = p.plan_boundary(batch)
    mine = p._offered
    loads = []
    for load in plan.loads:
        if load.slot in held:
            p.cancel(load)
        else:
            loads.append(load)
    p._offered, p._queued = running, [s for s in mine if s not in held]
    return Boundary(tuple(loads), tuple(p._queued), residency(p))


def forget_offered(policy: CachePolicy) -> None:
    """Empty the candidate slots offered to a step that ran and will not be settled (its fills are unknown)."""
    p = policy
    for slot in p._offered:
        key = p.key_in[slot]
        if key is not None:
            p._free.append(p._vacate(key))
    p._offered = []


def residency(policy: CachePolicy) -> np.ndarray:
    """[S] the key l*E+e each slot holds in the policy's view (-1: empty)."""
    p = policy
    return np.where(p.slot_layer >= 0, p.slot_layer * p.num_experts + p.slot_expert, -1)


def fill_pool(policy: CachePolicy) -> Boundary | None:
    """A pool that can hold every expert: prefetches of every expert not resident (None: none to copy, or the pool
    is smaller than the experts)."""
    p = policy
    if p.num_slots < p.num_layers * p.num_experts:
        return None
    keys = [(layer, e) for layer in range(p.num_layers) for e in range(p.num_experts)]
    loads = tuple(load for key in keys if (load := p.admit(key)) is not None)
    return Boundary(loads, (), residency(p)) if loads else None
