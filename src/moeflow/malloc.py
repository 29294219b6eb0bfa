"""The C allocator's hold on freed memory, on a CPU where every byte it keeps is RSS beyond the memory budget.

glibc's malloc serves a block of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own mapping and
unmaps it at free, but it raises that threshold to the size of each such block freed (up to 32 MiB): after the first
free of an expert-sized tensor, the transients of expert reads, conversions and compute come from its heaps and
arenas (one per thread that allocates, e.g. the disk reader), which keep the pages once freed. On the 1-layer
OLMoE-geometry test checkpoint (tests/test_rss.py) that held 60-90 MiB beyond the budget after 8 tokens (the
steady RSS varied from run to run with which arena the reader thread got). A fixed threshold turns the adjustment
off, so blocks of ``LARGE_BLOCK`` bytes and more go back to the system at free; ``trim`` hands back the free pages
left in the heaps after load. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h)."""

LARGE_BLOCK = 1 << 20
"""Blocks from this size on are mapped and unmapped (a decode step's activations stay below it; weights, expert rows
and their read buffers are above)."""


def _glibc() -> Any | None:
    """The process's C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (
        hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version")
    ):
        return None
    return libc


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (freed blocks that size or larger leave RSS at once);
    True when set."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1)


def trim() -> bool:
    """Return the heaps' free pages to the system (``malloc_trim(0)``); True when glibc released some."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)))
