"""The slot-table experts kernel (Triton, CUDA only): one projection of a MoE layer for every routed pair.

Program ``(e, n-block)`` serves expert ``e`` of the layer for all the tokens routed to it: it reads the expert's
weights once, from its device slot when ``table[e] >= 0``, else straight from pinned host memory (zero-copy over
UVA: the host pool is addressed as an element offset from the slot pool's base pointer), and, for a missed expert
with a reserved fill slot, writes what it read into that slot (a read-through fill: the bytes cross the link once).
The caller groups the pairs by expert (``order``, ``counts``, ``starts``) with device ops, so nothing here needs
the host. Legend: P pairs (T tokens x K), N output features, D input features, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def program_expert(counts_ptr, E, COMPACT: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, its pair count) that program row ``program_id(0)`` serves: with ``COMPACT`` the i-th used expert (the
    grid covers at most P experts, not all E; past the used ones the count is 0), else expert ``program_id(0)``."""
    if COMPACT:
        offs_e = tl.arange(0, E_POW2)
        used = (tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0) > 0).to(tl.int32)
        mine = (used > 0) & (tl.cumsum(used, 0) - used == tl.program_id(0))
        e = tl.sum(tl.where(mine, offs_e, 0))
        cnt = tl.where(tl.sum(mine.to(tl.int32)) > 0, tl.load(counts_ptr + e), 0)
    else:
        e = tl.program_id(0)
        cnt = tl.load(counts_ptr + e)
    return e, cnt


@triton.jit
def _slot_linear(
    x_ptr,  # [R, D] inputs: tokens (first projection) or pairs (second)
    stride_x,
    y_ptr,  # [P, N] outputs, by pair
    stride_y,
    order_ptr,  # [P] pair ids sorted by expert
    counts_ptr,  # [E] pairs per expert
    starts_ptr,  # [E] first index of each expert's pairs in order
    slot_ptr,  # [E] device slot of each expert, -1 when not resident
    claim_ptr,  # [E] reserved slot to fill with a missed expert, -1 for none
    pool_ptr,  # slot pool base; expert row r of the pool starts at pool_ptr + r * row_stride
    host_delta,  # element offset from pool_ptr to the host pool's first row
    host_row0,  # host row of expert 0 of this layer
    row_stride,
    w_off,  # offset of this weight inside an expert row; element (n, d) at w_off + n * swn + d * swd
    swn,
    swd,
    b_off,  # offset of the bias [N] inside an expert row (HAS_BIAS)
    N,
    D,
    K,
    E,
    PAIR_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPACT: tl.constexpr,
    E_POW2: tl.constexpr,
    FILL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    nb = tl.program_id(1)
    e, cnt = program_expert(counts_ptr, E, COMPACT, E_POW2)
    if cnt > 0:
        start = tl.load(starts_ptr + e)
        slot = tl.load(slot_ptr + e).to(tl.int64)
        claim = tl.load(claim_ptr + e).to(tl.int64)
        host_row = host_delta + (host_row0 + e).to(tl.int64) * row_stride
        # rows start 16-element aligned (the wrapper checks): say so, or the loads are not vectorised
        row_base = tl.multiple_of(tl.where(slot >= 0, slot * row_stride, host_row), 16)
        fill = claim >= 0
        fill_base = pool_ptr + tl.multiple_of(tl.maximum(claim, 0) * row_stride, 16)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        for m0 in range(0, cnt, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < cnt
            pair = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
            if PAIR_ROWS:
                rows = pair
            else:
                rows = pair // K
            first = m0 == 0
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                xt = tl.load(
                    x_ptr + rows[:, None] * stride_x + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                w_idx = w_off + offs_d[:, None] * swd + offs_n[None, :] * swn  # [BLOCK_D, BLOCK_N]
                w_ok = d_ok[:, None] & n_ok[None, :]
                wt = tl.load(pool_ptr + row_base + w_idx, mask=w_ok, other=0.0)
                if FILL:
                    tl.store(fill_base + w_idx, wt, mask=w_ok & fill & first)
                if IEEE:
                    acc = tl.dot(xt, wt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, wt, acc)
            if HAS_BIAS:
                b = tl.load(pool_ptr + row_base + b_off + offs_n, mask=n_ok, other=0.0)
                if FILL:
                    tl.store(fill_base + b_off + offs_n, b, mask=n_ok & fill & first)
                acc += b[None, :].to(tl.float32)
            tl.store(
                y_ptr + pair[:, None] * stride_y + offs_n[None, :],
                acc.to(y_ptr.dtype.element_ty),
                mask=m_ok[:, None] & n_ok[None, :],
            )


BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1}
"""Tile sizes and launch options: the fastest from slots on the H200 at decode batch 1 and 8, both projections over
all 16 layers of OLMoE geometry in one graph (so the L2 cache cannot serve repeats): 0.502 ms for 1.61 GB at batch
1 (3.2 TB/s; the former 32x64 tiles, 2 warps: 0.544 ms) and 2.107 ms at batch 8 (4.0 TB/s; 2.228 ms), in
decode-floor-h200.json's kernel stage. Reads from host are link-bound whatever the tiles (~51 GB/s). ``COMPACT``
(1) launches programs for at most P experts, each finding its used expert, instead of one program row per expert
of the layer (most of which would exit at once when P is small)."""


def slot_linear(
    x: torch.Tensor,  # [R, D]
    y: torch.Tensor,  # [P, N], written for the pairs of experts in use
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # order [P], counts [E], starts [E] (int32)
    slot: torch.Tensor,  # [E] int32
    claim: torch.Tensor,  # [E] int32
    pool: torch.Tensor,  # [S, row] slot pool
    host: torch.Tensor,  # [L*E, row] pinned host pool
    host_row0: int,
    weight: tuple[int, int, int],  # (offset, stride along N, stride along D) inside an expert row
    bias_off: int | None,
    k: int,
    pair_rows: bool,
    fill: bool,
    blocks: dict | None = None,
) -> None:
    order, counts, starts = groups
    n, d = y.shape[1], x.shape[1]
    opts = {**BLOCKS, **(blocks or {})}
    num_experts = counts.shape[0]
    itemsize = pool.element_size()
    delta = host.data_ptr() - pool.data_ptr()
    aligned = delta % (16 * itemsize) == 0 and pool.stride(0) % 16 == 0 and weight[0] % 16 == 0
    assert aligned and (bias_off is None or bias_off % 16 == 0), "expert rows must start 16-element aligned"
    compact = bool(opts.pop("COMPACT", 0))
    rows = min(num_experts, order.shape[0]) if compact else num_experts
    grid = (rows, triton.cdiv(n, opts["BLOCK_N"]))
    _slot_linear[grid](
        x, x.stride(0), y, y.stride(0), order, counts, starts, slot, claim, pool,
        delta // itemsize, host_row0, pool.stride(0), weight[0], weight[1], weight[2],
        bias_off if bias_off is not None else 0, n, d, k, num_experts,
        PAIR_ROWS=pair_rows, HAS_BIAS=bias_off is not None, COMPACT=compact, E_POW2=triton.next_power_of_2(num_experts),
        FILL=fill, IEEE=x.dtype == torch.float32,
        **opts,
    )  # fmt: skip
