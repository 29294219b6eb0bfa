"""The classic cache policies: LRU (the on-demand baseline both papers compare against) and LFU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.experts.cache import CachePolicy, Key, register_policy


@dataclass
class _RankedSlots(CachePolicy):
    """A policy whose victims are the lowest-ranked resident keys, chosen over every slot at once in NumPy."""

    def slot_ranks(self) -> tuple[np.ndarray, ...]:
        """[S] int64 arrays that order the slots for eviction, most significant last (as ``np.lexsort`` takes)."""
        raise NotImplementedError

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        if may_evict is not None:
            return super().select_victim(protect, layer, may_evict)
        chosen = self.select_victims(1, protect, layer)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        blocked = self.slot_layer < 0  # [S] empty slots hold nothing to evict
        for key in protect:  # the smaller set: intersecting with the keys view copies every key
            if key in self.slot_of:
                blocked[self.slot_of[key]] = True
        order = np.lexsort((*self.slot_ranks(), blocked))[:n]  # stable: ties go to the lowest slot
        return [self.key_in[s] for s in order if not blocked[s]]


@dataclass
class LRUPolicy(_RankedSlots):
    """Evict the expert whose last request (or admission) is oldest."""

    def __post_init__(self) -> None:
        self.name = "lru"

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=self.last_use)

    def on_admit(self, key: Key) -> None:
        self.touch(key)  # a prefetched expert counts as just used

    def slot_ranks(self) -> tuple[np.ndarray, ...]:
        return (self.slot_used,)


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

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: (self._count[k], self._last[k]))

    def slot_ranks(self) -> tuple[np.ndarray, ...]:
        lay, exp = np.maximum(self.slot_layer, 0), np.maximum(self.slot_expert, 0)
        return self._last[lay, exp], self._count[lay, exp]  # by count, then by last request


register_policy("lru", LRUPolicy)
register_policy("lfu", LFUPolicy)
