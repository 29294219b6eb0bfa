"""Belady's offline optimum (MIN): evict the resident expert whose next request is furthest in the future.

It needs the whole future, so it runs only in the simulator: ``setup`` takes the replayed trace from
``PolicyContext.trace`` and rebuilds the exact request sequence the simulator will issue (same schedule, same
chunking; ``options["batch_size"]``). A cursor advances on every request; if the calls ever stray from the
precomputed sequence the policy is still correct bookkeeping, only no longer optimal. Without prefetching, no
policy needs fewer loads: its demand misses bound every other policy's loads (misses + prefetches).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from moeflow.errors import MoeflowError
from moeflow.experts.cache import CachePolicy, Key, PolicyContext, register_policy


@dataclass
class BeladyPolicy(CachePolicy):
    def __post_init__(self) -> None:
        self.name = "belady"
        self._uses: dict[Key, list[int]] = {}
        self._cursor = 0

    def setup(self, context: PolicyContext) -> None:
        if context.trace is None:
            raise MoeflowError(
                "the 'belady' policy needs the future routing, which only the simulator has: "
                "use it with `moeflow simulate`, not for serving"
            )
        from moeflow.sim.simulator import access_sequence

        batch = int(context.options.get("batch_size", 1))
        self.set_sequence(access_sequence(context.trace, batch, self.num_slots))  # type: ignore[arg-type]

    def set_sequence(self, sequence: Sequence[Key]) -> None:
        """The keys that will be requested, in order."""
        self._uses = {}
        for i, key in enumerate(sequence):
            self._uses.setdefault((int(key[0]), int(key[1])), []).append(i)
        self._cursor = 0

    def on_access(self, key: Key) -> None:
        self._cursor += 1

    def next_use(self, key: Key) -> float:
        """Position of ``key``'s next request at or after the cursor (inf: never again)."""
        uses = self._uses.get(key, ())
        i = bisect.bisect_left(uses, self._cursor)
        return uses[i] if i < len(uses) else float("inf")

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return max(candidates, key=self.next_use)


register_policy("belady", BeladyPolicy)
