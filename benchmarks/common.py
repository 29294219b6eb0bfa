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


def event_ms(fn, reps: int = 20, warmup: int = 0) -> float:
    """Median milliseconds of ``fn`` (anything queued on the current stream) over ``reps`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, reps: int = 20) -> float:
    """Median device time of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return event_ms(g.replay, reps)
