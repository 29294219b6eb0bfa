"""Helpers shared by the GPU benchmark scripts."""

from __future__ import annotations

import time

import torch


def sync() -> None:
    """Wait for queued device work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    """Best of five pinned host -> device copies of ``nbytes``, in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
