"""A run of prefetches placed at once (pure Python/NumPy): the bookkeeping of ``CachePolicy.admit`` repeated for
keys in order, each into the lowest free slot while any is left and then over the next of the given victims, done in
one pass (slots and residency set with NumPy, the ``Load``s built without the frozen dataclass's ``__init__``).

The keys are distinct and not resident, and the victims resident and distinct from them, so the admissions do not
interact: the result (slots, loads, counters, the unused-prefetch set) is that of ``admit(key, priority,
victim=...)`` called key after key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.plan import Key, Load

if TYPE_CHECKING:
    from moeflow.experts.cache import CachePolicy


def prefetch_load(key: Key, slot: int, evicted: Key | None, priority: float) -> Load:
    """``Load(key, slot, evicted, True, priority)`` without the frozen dataclass's per-field ``__init__``."""
    load = object.__new__(Load)
    load.__dict__.update(key=key, slot=slot, evicted=evicted, prefetch=True, priority=priority)
    return load


def admit_run(
    policy: CachePolicy, keys: Sequence[Key], priorities: Sequence[float], victims: Sequence[Key]
) -> list[Load]:
    """Prefetch ``keys`` (not resident, distinct) with ``priorities``: the free slots first (lowest index first),
    then over ``victims`` in order (resident, not among ``keys``; at least as many as the keys the free slots
    leave). Returns their loads, in order."""
    p = policy
    n_free = min(len(keys), len(p._free))
    evicted = list(victims[: len(keys) - n_free])
    if len(evicted) < len(keys) - n_free:
        raise ValueError("fewer victims than the keys the free slots leave")
    slots = [p._free.pop() for _ in range(n_free)] + [p.slot_of.pop(v) for v in evicted]
    unused = p._unused_prefetch
    if evicted:
        p.stats.evictions += len(evicted)
        if unused:
            wasted = unused.intersection(evicted)
            p.stats.prefetch_wasted += len(wasted)
            unused -= wasted
    loads = []
    olds: list[Key | None] = [None] * n_free + evicted
    for key, slot, old, pri in zip(keys, slots, olds, priorities):
        p.slot_of[key] = slot
        p.key_in[slot] = key
        loads.append(prefetch_load(key, slot, old, pri))
    if slots:
        idx = np.array(slots, np.int64)
        p.slot_layer[idx] = [k[0] for k in keys]
        p.slot_expert[idx] = [k[1] for k in keys]
        p.slot_used[idx] = -1
    p.stats.prefetches += len(keys)
    unused.update(keys)
    if type(p).on_admit is not _base_on_admit():
        for key in keys:
            p.on_admit(key)
    return loads


def _base_on_admit():  # type: ignore[no-untyped-def]
    from moeflow.experts.cache import CachePolicy

    return CachePolicy.on_admit
