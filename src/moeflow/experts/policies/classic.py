"""The classic cache policies: LRU (the on-demand baseline both papers compare against) and LFU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.experts.cache import CachePolicy, Key, register_policy
from moeflow.experts.policies.ranking import first_sorted


@dataclass
class _RankedSlots(CachePolicy):
    """A policy whose victims are the lowest-ranked resident keys, chosen over every slot at once in NumPy."""

    partial_sort = True
    """Select the victims by a partition first (else a full stable sort: faster where the ranks come in long
    sorted runs, as orders of use do)."""

    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_slots, num_layers, num_experts, top_k)
        self._rank_hint: list = [None]  # speeds the victim sort up (``ranking.first_sorted``)

    def slot_rank(self) -> np.ndarray:
        """[S] int64 >= 0 that orders the slots for eviction, lowest first (ties: the lowest slot)."""
        raise NotImplementedError

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        if may_evict is not None:
            return super().select_victim(protect, layer, may_evict)
        chosen = self.select_victims(1, protect, layer)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        """The first ``n`` unblocked slots in ``slot_rank`` order (a stable partial sort, with the blocked slots
        ranked last: empty slots and ``protect``-ed keys)."""
        get = self.slot_of.get  # the smaller set: intersecting with the keys view copies every key
        return self._first(n, [s for s in map(get, protect) if s is not None])

    def victims_for(self, n: int, keys: list[Key], found: list[int | None], layer: int) -> list[Key]:
        return self._first(n, [s for s in found if s is not None])

    def _first(self, n: int, held: list[int]) -> list[Key]:
        """The first ``n`` slots in ``slot_rank`` order, the empty slots and the slots ``held`` blocked."""
        # above every rank: blocked slots come last
        rank = np.where(self.slot_layer < 0, _LAST, self.slot_rank())
        rank[held] = _LAST
        order = first_sorted(rank, n, self._rank_hint, self.partial_sort)
        key_in = self.key_in
        return [key_in[s] for s in order[rank[order] != _LAST].tolist()]


_LAST = np.iinfo(np.int64).max


@dataclass
class LRUPolicy(_RankedSlots):
    """Evict the expert whose last request (or admission) is oldest."""

    partial_sort = False

    def __post_init__(self) -> None:
        self.name = "lru"

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=self.last_use)

    def on_admit(self, key: Key) -> None:
        self.touch(key)  # a prefetched expert counts as just used

    def slot_rank(self) -> np.ndarray:
        return self.slot_used  # unique orders of use, -1 (placed, not used since) first


@dataclass
class LFUPolicy(_RankedSlots):
    """Evict the expert requested least often so far (ties: least recently; then the lowest slot)."""

    def __post_init__(self) -> None:
        self.name = "lfu"

    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_slots, num_layers, num_experts, top_k)
        self._count = np.zeros((num_layers, num_experts), np.int64)  # [L, E] requests so far
        self._last = np.full((num_layers, num_experts), -1, np.int64)  # [L, E] clock of the last request

    def on_access(self, key: Key) -> None:
        self._count[key] += 1
        self._last[key] = self.clock

    def on_access_keys(self, keys: list[Key]) -> None:
        """``on_access`` of each of one layer's keys, at once (the clock is the same for all)."""
        if keys:
            experts = [k[1] for k in keys]  # distinct: one increment each
            layer = keys[0][0]
            self._count[layer, experts] += 1
            self._last[layer, experts] = self.clock

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: (self._count[k], self._last[k]))

    def slot_rank(self) -> np.ndarray:
        """By count, then by last request: both packed into one int64 (count above 32 bits, last request + 1
        below), or, past those bounds, each slot's place in ``np.lexsort((last, count))``."""
        flat = np.maximum(self.slot_layer, 0) * self.num_experts + np.maximum(self.slot_expert, 0)
        count, last = self._count.take(flat), self._last.take(flat)
        if self.clock < 2**32 - 1 and int(count.max(initial=0)) < 2**31 - 1:
            return (count << 32) | (last + 1)
        rank = np.empty(len(flat), np.int64)
        rank[np.lexsort((last, count))] = np.arange(len(flat))
        return rank


register_policy("lru", LRUPolicy)
register_policy("lfu", LFUPolicy)
