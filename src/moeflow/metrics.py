"""Per-output statistics: cache hits and misses, bytes moved, transfer stalls, latency and throughput; the time a
serving engine spends in each phase of its steps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


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


Counters = tuple[int, int, int, int, int, float]
"""(hits, misses, prefetches, bytes to device, bytes from disk, stall seconds): a snapshot of the running totals."""


def batch_stats(
    before: Counters, after: Counters, generated: list[int], t0: float, t_first: float, t_end: float
) -> Stats:
    """One batch's statistics from two snapshots of the totals, its sequences' generated token counts and its
    start, first-token and end times."""
    delta = [a - b for a, b in zip(after, before)]
    n_tokens, steps = sum(generated), max(generated)
    return Stats(
        hits=int(delta[0]), misses=int(delta[1]), prefetches=int(delta[2]), bytes_to_device=int(delta[3]),
        bytes_from_disk=int(delta[4]), stall_s=float(delta[5]), ttft_s=t_first - t0,
        tpot_s=(t_end - t_first) / (steps - 1) if steps > 1 else 0.0,
        tokens_per_s=n_tokens / (t_end - t0) if t_end > t0 else 0.0, batch_size=len(generated),
        generated_tokens=n_tokens,
    )  # fmt: skip


@dataclass
class PhaseClock:
    """Wall time and count of each phase of a serving engine's steps (``decode``: the decode forward and its
    sampling; ``prefill``: prompt-chunk forwards; ``admit``: choosing the requests that join), and the prompt
    tokens the prefill forwards ran. A phase's time ends once its tokens are read back from the device."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    prefill_tokens: int = 0

    def add(self, phase: str, t0: float) -> None:
        """Count one ``phase`` that started at ``t0`` (``time.perf_counter()``) and has just ended."""
        self.seconds[phase] += time.perf_counter() - t0
        self.count[phase] += 1


PHASES = ("admit", "decode", "prefill")
