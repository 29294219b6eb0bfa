"""What a cache policy counts as it runs: hits, misses, prefetches and their fate, evictions (kept apart from the
residency it manages and the scores it keeps)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PolicyStats:
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    """Prefetch loads planned (minus those the store dropped uncopied)."""
    prefetch_hits: int = 0
    """Requested experts that were resident because a prefetch brought them."""
    prefetch_wasted: int = 0
    """Prefetched experts evicted (or never used by the end) without serving a request."""
    prefetch_dropped: int = 0
    """Prefetches the store dropped before copying (their layer had passed): no bytes moved, slot freed."""
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0
