"""Copy a layer's claimed misses into their slots ahead of the compute (Triton, CUDA only; the CPU reference is in
``ops.py``): the option ``PRECOPY`` of the slot-table experts.

By default a missed expert is read by the projection kernels straight from the pinned host pool (zero-copy) and
written into its claimed slot as it is read. Where the kernel is compute-bound (the quantised kernel's integer
path dequantises as it reads), the same programs cannot keep enough reads in flight for the link, so misses cost
more than their bytes at link speed. With ``PRECOPY`` each used, missed expert that claimed a slot is first copied
whole from host to that slot by this bandwidth-bound kernel (program ``(e, chunk)`` copies ``CHUNK`` bytes of expert
``e``'s row), and the projections then read it from the slot as a hit: the layer costs its missed bytes at link
speed plus its resident compute, the policies' own floor. A miss without a claimed slot is still read zero-copy.
The copy writes only a slot the step cannot read again (the claim rule, ``claims.py``), so no other read depends on
it. Legend: E experts of the layer, S slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1 << 16
"""Bytes one program copies: a 3.3 MB int4 OLMoE expert is 52 programs (many reads in flight on the link)."""

BLOCK = 4096
"""Bytes per load of a program's loop."""


@triton.jit
def _fill_claimed(counts_ptr, slot_ptr, claim_ptr, pool_ptr, host_delta, host_row0, row_stride, row_bytes,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    e = tl.program_id(0)
    chunk = tl.program_id(1)
    cnt = tl.load(counts_ptr + e)
    slot = tl.load(slot_ptr + e)
    claim = tl.load(claim_ptr + e).to(tl.int64)
    if (cnt > 0) & (slot < 0) & (claim >= 0):
        src = pool_ptr + host_delta + (host_row0 + e).to(tl.int64) * row_stride
        dst = pool_ptr + claim * row_stride
        for off in range(0, CHUNK, BLOCK):
            offs = chunk * CHUNK + off + tl.arange(0, BLOCK)
            ok = offs < row_bytes
            tl.store(dst + offs, tl.load(src + offs, mask=ok), mask=ok)


def fill_claimed(
    counts: torch.Tensor,  # [E] int32 pairs per expert
    slot: torch.Tensor,  # [E] int32 the layer's slot row (-1: not resident)
    claim: torch.Tensor,  # [E] int32 the slot each miss claimed (-1: none)
    pool: torch.Tensor,  # [S, row] slot pool
    host: torch.Tensor,  # [L*E, row] pinned host pool
    host_row0: int,
) -> None:
    """Copy every used, missed expert with a claimed slot from ``host`` into ``pool`` (one launch)."""
    pool8, host8 = pool.view(torch.uint8), host.view(torch.uint8)
    delta = host8.data_ptr() - pool8.data_ptr()
    row_bytes = pool8.shape[1]
    assert host8.shape[1] == row_bytes and pool8.stride(0) == host8.stride(0) == row_bytes
    grid = (counts.shape[0], triton.cdiv(row_bytes, CHUNK))
    _fill_claimed[grid](
        counts, slot, claim, pool8, delta, host_row0, row_bytes, row_bytes, CHUNK=CHUNK, BLOCK=BLOCK
    )
