"""What is counted as the engine runs: by a cache policy (hits, misses, prefetches and their fate, evictions; kept
apart from the residency it manages and the scores it keeps) and by the expert store (bytes per tier, loads, stalls)."""

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


@dataclass
class StoreStats:
    bytes_to_device: int = 0
    """Bytes copied host -> device slots (demand + prefetch)."""
    bytes_zero_copy: int = 0
    """Of ``bytes_to_device``: experts the static step's kernel read straight from host memory (misses)."""
    bytes_from_disk: int = 0
    """Bytes read from the checkpoint into the host pool."""
    demand_loads: int = 0
    prefetch_loads: int = 0
    prefetch_promoted: int = 0
    """Queued prefetches a layer needed before the reader reached them: copied at once on the demand stream."""
    prefetch_dropped: int = 0
    """Queued prefetches dropped unread: their layer had passed, or a later load took their slot."""
    stall_s: float = 0.0
    """Wall time the forward pass spent waiting for expert transfers (disk reads included)."""
