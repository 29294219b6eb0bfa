"""The classic cache policies: LRU (the on-demand baseline both papers compare against) and LFU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.experts.cache import CachePolicy, Key, register_policy


@dataclass
class LRUPolicy(CachePolicy):
    """Evict the expert whose last request is oldest."""

    def __post_init__(self) -> None:
        self.name = "lru"

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=self.last_use)

    def on_admit(self, key: Key) -> None:
        self.touch(key)  # a prefetched expert counts as just used

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        """``victim`` over every slot at once: the least recently requested (or admitted) resident key."""
        if may_evict is not None:
            return super().select_victim(protect, layer, may_evict)
        chosen = self.select_victims(1, protect, layer)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        never = np.iinfo(np.int64).max
        used = np.where(self.slot_layer >= 0, self.slot_used, never)  # [S]
        for key in protect & self.slot_of.keys():
            used[self.slot_of[key]] = never
        order = np.argsort(used, kind="stable")[:n]
        return [self.key_in[s] for s in order if used[s] < never]


@dataclass
class LFUPolicy(CachePolicy):
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

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        if may_evict is not None:
            return super().select_victim(protect, layer, may_evict)
        chosen = self.select_victims(1, protect, layer)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        """The ``n`` least-often requested resident keys (ties: least recently), over every slot at once."""
        never = np.iinfo(np.int64).max
        held = self.slot_layer >= 0  # [S]
        lay, exp = np.maximum(self.slot_layer, 0), np.maximum(self.slot_expert, 0)
        count = np.where(held, self._count[lay, exp], never)  # [S]
        for key in protect & self.slot_of.keys():
            count[self.slot_of[key]] = never
        order = np.lexsort((self._last[lay, exp], count))[:n]  # by count, then by last request
        return [self.key_in[s] for s in order if count[s] < never]


register_policy("lru", LRUPolicy)
register_policy("lfu", LFUPolicy)
