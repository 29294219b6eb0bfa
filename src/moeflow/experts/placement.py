"""A run of prefetches placed at once (pure Python/NumPy): the bookkeeping of ``CachePolicy.admit`` repeated for
keys in order, each into the lowest free slot while any is left and then over the next of the given victims, done in
one pass (slots and residency set with NumPy, the ``Load``s built in one C-level pass).

The keys are distinct and not resident, and the victims resident and distinct from them, so the admissions do not
interact: the result (slots, loads, counters, the unused-prefetch set) is that of ``admit(key, priority,
victim=...)`` called key after key."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.plan import Key, Load

if TYPE_CHECKING:
    from moeflow.experts.cache import CachePolicy


def make_loads(
    keys: Sequence[Key],
    slots: Sequence[int],
    evicted: Sequence[Key | None],
    prefetch: bool,
    priorities: Sequence[float] | float,
) -> list[Load]:
    """``[Load(key, slot, old, prefetch, priority) ...]``, each built by ``tuple.__new__`` from its fields (no
    Python-level call per load: a layer's misses build one each); ``priorities`` one per key, or one for all."""
    pri = repeat(priorities) if isinstance(priorities, float) else priorities
    return list(map(_new_load, zip(keys, slots, evicted, repeat(prefetch), pri)))


_new_load = partial(tuple.__new__, Load)


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
    slots = take_free(p._free, n_free) + p._evict(evicted)
    p.slot_of.update(zip(keys, slots))
    key_in = p.key_in
    for slot, key in zip(slots, keys):
        key_in[slot] = key
    loads = make_loads(keys, slots, [None] * n_free + evicted, True, list(priorities))
    if slots:
        idx = np.array(slots, np.int64)
        p.slot_layer[idx] = [k[0] for k in keys]
        p.slot_expert[idx] = [k[1] for k in keys]
        p.slot_used[idx] = -1
    p.stats.prefetches += len(keys)
    p._unused_prefetch.update(keys)
    if type(p).on_admit is not _base_on_admit():
        for key in keys:
            p.on_admit(key)
    return loads


def take_free(free: list[int], n: int) -> list[int]:
    """``[free.pop() for _ in range(n)]`` (``n`` at most ``len(free)``) by one slice: the free slots are kept
    highest index first, so these are the ``n`` lowest, lowest first."""
    cut = len(free) - n
    taken = free[cut:][::-1]
    del free[cut:]
    return taken


def _base_on_admit():  # type: ignore[no-untyped-def]
    from moeflow.experts.cache import CachePolicy

    return CachePolicy.on_admit
