"""Per-output statistics: cache hits and misses, bytes moved, transfer stalls, latency and throughput."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    bytes_from_disk: int = 0
    prefetches: int = 0
    stall_s: float = 0.0
    """Time the forward pass waited on expert transfers."""
    ttft_s: float = 0.0
    """Time to first token."""
    tpot_s: float = 0.0
    """Mean time per output token after the first."""
    tokens_per_s: float = 0.0
    """Generated tokens per second of this output's batch, over the whole batch."""
    batch_size: int = 1
    """Sequences that ran together (the counters above are the batch's: transfers are shared)."""
    generated_tokens: int = 0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hit_ratio"] = self.hit_ratio
        return d
