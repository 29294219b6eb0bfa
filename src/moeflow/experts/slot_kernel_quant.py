# ruff: noqa: SIM108  (Triton: if/else on constexpr flags, not ternaries)
"""The slot-table experts kernel for quantised rows (Triton, CUDA only): :mod:`moeflow.experts.slot_kernel`'s
program structure, reading each weight as its :class:`~moeflow.quant.row.RowCodec` bytes and dequantising them in
registers before ``tl.dot``.

Program ``(e, n-block)`` serves expert ``e`` (with ``COMPACT``: the e-th used expert) for all its routed pairs: the
row comes from its device slot (``table[e] >= 0``) or zero-copy from the pinned host pool (a byte offset from the
slot pool's base), so a miss moves the quantised bytes over the link, not the full-precision ones; a missed expert
with a claimed slot has the raw bytes it read (codes, scales, zero points, bias) written into that slot
(read-through fill).

Layout (see :mod:`moeflow.experts.quant_proj`): weight (n, d) is code ``n * D + d``; ``PER = 8 // BITS`` codes per
byte, code ``j`` of a byte in bits ``[j * BITS, (j + 1) * BITS)``. A D-tile of ``BLOCK_D`` inputs is read as
``BLOCK_D / PER`` bytes per output; each of the ``PER`` code planes is dequantised and multiplied with the inputs
``d0 + PER * i + j`` (a strided read of x), so every byte is loaded once. Scale (and zero) of (n, d) at
``n * G + d // GROUP``; with ``ONE_GROUP`` (the group a multiple of the tile) one [BLOCK_N] vector per tile.

Fast integer path (``FAST``, see :func:`fast`), taken for integer codes below 128 (int4; int2's groups, at most 32
inputs, are narrower than its smallest tile, 64) when each D-tile lies in one group (``ONE_GROUP``) and the inputs
are bf16 or fp16: no weight is dequantised. Each plane's codes become ``MAGIC + q`` in x's dtype by OR-ing them into
the bits of ``MAGIC`` (bf16 0x4300 = 128.0 with 7 mantissa bits, fp16 0x6400 = 1024.0 with 10: exact), the tile
accumulates ``t = sum_j x_j @ (MAGIC + q_j)`` in float32 and ``xs``, its inputs summed per row, and the group's
scale and zero apply once per tile: ``w = q * s + z = (MAGIC + q) * s + (z - MAGIC * s)``, so
``acc += t * s + xs * (z - MAGIC * s)``. No int-to-float conversion, multiply-add or rounding per weight (w is never
rounded to x's dtype, so closer to exact than dequantising). fp32 inputs, fp8, MXFP4, int8 and groups smaller than
the tile dequantise each weight as above.
Legend: P pairs, N output features, D input features, E experts, G groups per output row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.experts.quant_proj import KIND_FP8, KIND_INT, KIND_MX, QuantProj
from moeflow.experts.slot_kernel import program_expert


@triton.jit
def _scale(s, MX: tl.constexpr):
    """A loaded scale as float32: an e8m0 byte (MXFP4) is the power of two ``2**(s - 127)``."""
    if MX:
        return tl.exp2(s.to(tl.float32) - 127.0)
    return s.to(tl.float32)


@triton.jit
def _e2m1(code):
    """The e2m1 value of 4-bit codes (bit 3 the sign): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    m = (code & 7).to(tl.int32)
    e = (m >> 1).to(tl.float32)
    big = (1.0 + 0.5 * (m & 1).to(tl.float32)) * tl.exp2(e - 1.0)
    v = tl.where(m < 2, 0.5 * m.to(tl.float32), big)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _fast_tile(acc, byte, x_ptr, stride_x, rows, m_ok, d_first, i_ok, s, z, BITS: tl.constexpr, PER: tl.constexpr,
               MASK: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):  # fmt: skip
    """``acc`` plus one D-tile of one group (scale ``s``, zero ``z``, [1, BLOCK_N] float32) by the fast integer
    path (module docstring): the codes' planes as ``MAGIC + q`` in x's dtype, the scale and zero applied once."""
    t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # sum_j x_j @ (MAGIC + q_j)
    xsum = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    b16 = byte.to(tl.int16)
    for j in tl.static_range(PER):
        biased = (((b16 >> (j * BITS)) & MASK) | MAGIC_BITS).to(tl.int16)  # the bits of MAGIC + q
        w = biased.to(x_ptr.dtype.element_ty, bitcast=True)  # masked bytes (MAGIC) meet masked (zero) inputs
        xt = tl.load(x_ptr + rows[:, None] * stride_x + (d_first + j)[None, :], mask=m_ok[:, None] & i_ok[None, :],
                     other=0.0)  # fmt: skip
        t = tl.dot(xt, w, t)
        xsum += xt.to(tl.float32)
    xs = tl.sum(xsum, axis=1)  # [BLOCK_M] the tile's inputs summed per row
    return acc + t * s + xs[:, None] * (z - MAGIC * s)


@triton.jit
def _slot_linear_quant(
    x_ptr,  # [R, D]
    stride_x,
    y_ptr,  # [P, N]
    stride_y,
    order_ptr,
    counts_ptr,
    starts_ptr,
    slot_ptr,
    claim_ptr,
    pool_ptr,  # uint8 slot pool base; row r at pool_ptr + r * row_stride
    host_delta,  # byte offset from pool_ptr to the host pool's first row
    host_row0,
    row_stride,
    codes_off,
    scale_off,
    zero_off,
    b_off,
    N,
    K,
    GROUP,
    G,
    E,
    D: tl.constexpr,  # constexpr: a static loop bound (pipelined; Triton's interpreter runs it)
    FP8: tl.constexpr,
    MX: tl.constexpr,  # MXFP4: e2m1 codes, e8m0 (uint8) scales, no zero points
    BITS: tl.constexpr,
    PER: tl.constexpr,  # 8 // BITS codes per byte
    MASK: tl.constexpr,  # 2**BITS - 1
    SCALE_F16: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    FAST: tl.constexpr,  # the fast integer path (module docstring); implies ONE_GROUP
    MAGIC_BITS: tl.constexpr,  # FAST: the bits of MAGIC in x's dtype
    MAGIC: tl.constexpr,
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
        row = pool_ptr + tl.multiple_of(tl.where(slot >= 0, slot * row_stride, host_row), 16)
        fill = claim >= 0
        dst = pool_ptr + tl.multiple_of(tl.maximum(claim, 0) * row_stride, 16)
        if MX:
            sdt = tl.uint8
        elif SCALE_F16:
            sdt = tl.float16
        else:
            sdt = tl.float32
        s_src = (row + scale_off).to(tl.pointer_type(sdt))
        s_dst = (dst + scale_off).to(tl.pointer_type(sdt))
        z_src = (row + zero_off).to(tl.pointer_type(sdt))
        z_dst = (dst + zero_off).to(tl.pointer_type(sdt))
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        n64 = offs_n.to(tl.int64)
        m0 = 0
        while m0 < cnt:  # a loop bound loaded from memory: Triton's interpreter runs a while, not a range
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < cnt
            pair = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
            if PAIR_ROWS:
                rows = pair
            else:
                rows = pair // K
            put = fill & (m0 == 0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_i = tl.arange(0, BLOCK_D // PER)  # the bytes of a D-tile of one output
                d_first = d0 + offs_i * PER  # first input of each byte
                i_ok = d_first < D  # D % PER == 0: a byte is whole or out
                w_ok = i_ok[:, None] & n_ok[None, :]
                b_idx = (n64[None, :] * D + d_first[:, None]) // PER  # [BLOCK_D / PER, BLOCK_N]
                byte = tl.load(row + codes_off + b_idx, mask=w_ok, other=0)
                if FILL:
                    tl.store(dst + codes_off + b_idx, byte, mask=w_ok & put)
                if ONE_GROUP:
                    s_idx = n64 * G + d0 // GROUP  # [BLOCK_N]
                    s = tl.load(s_src + s_idx, mask=n_ok, other=0.0)
                    if FILL:
                        tl.store(s_dst + s_idx, s, mask=n_ok & put)
                    s = _scale(s, MX)[None, :]
                    if not FP8 and not MX:
                        z = tl.load(z_src + s_idx, mask=n_ok, other=0.0)
                        if FILL:
                            tl.store(z_dst + s_idx, z, mask=n_ok & put)
                        z = z.to(tl.float32)[None, :]
                if FAST:
                    acc = _fast_tile(acc, byte, x_ptr, stride_x, rows, m_ok, d_first, i_ok, s, z, BITS, PER, MASK,
                                     MAGIC_BITS, MAGIC, BLOCK_M, BLOCK_N, BLOCK_D // PER)  # fmt: skip
                else:
                    for j in tl.static_range(PER):
                        d_j = d_first + j
                        if not ONE_GROUP:
                            s_idx = n64[None, :] * G + (d_j // GROUP)[:, None]  # [BLOCK_D / PER, BLOCK_N]
                            s = tl.load(s_src + s_idx, mask=w_ok, other=0.0)
                            if FILL:
                                tl.store(s_dst + s_idx, s, mask=w_ok & put)
                            s = _scale(s, MX)
                            if not FP8 and not MX:
                                z = tl.load(z_src + s_idx, mask=w_ok, other=0.0)
                                if FILL:
                                    tl.store(z_dst + s_idx, z, mask=w_ok & put)
                                z = z.to(tl.float32)
                        if FP8:
                            w = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s
                        elif MX:
                            w = _e2m1((byte >> (j * BITS)) & MASK) * s
                        else:
                            q = ((byte >> (j * BITS)) & MASK).to(tl.float32)
                            w = q * s + z
                        w = w.to(x_ptr.dtype.element_ty)  # masked bytes meet masked (zero) inputs
                        xt = tl.load(
                            x_ptr + rows[:, None] * stride_x + d_j[None, :],
                            mask=m_ok[:, None] & i_ok[None, :],
                            other=0.0,
                        )
                        if IEEE:
                            acc = tl.dot(xt, w, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(xt, w, acc)
            if HAS_BIAS:
                b_src = (row + b_off).to(tl.pointer_type(tl.float32))
                b = tl.load(b_src + offs_n, mask=n_ok, other=0.0)
                if FILL:
                    tl.store((dst + b_off).to(tl.pointer_type(tl.float32)) + offs_n, b, mask=n_ok & put)
                acc += b.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
            tl.store(
                y_ptr + pair[:, None] * stride_y + offs_n[None, :],
                acc.to(y_ptr.dtype.element_ty),
                mask=m_ok[:, None] & n_ok[None, :],
            )
            m0 += BLOCK_M


BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1}
"""Tile sizes and launch options, the keys of the full-precision kernel's ``slot_kernel.BLOCKS`` (so one ``blocks``
dict serves both). The fastest int4 option of ``decode_floor.py``'s kernel stage on the H200 in every run since
session 22, at batch 1 and 8, OLMoE and Mixtral shapes (e.g. 0.92 against 1.25 ms for 16 OLMoE layers at batch 1,
3.83 against 5.61 ms for 8 Mixtral layers, against the former 32x64, 2 warps: ``decode-floor-quant-precopy-s29-
h200.json``, ``decode-floor-mixtral-int4-precopy-s29-h200.json``); fp8 ran fastest at 128x128, 8 warps, 3 stages
(``decode-floor-quant-s28-h200.json``), which ``blocks`` can ask for. ``COMPACT`` (1) launches programs for at most
P experts, each finding its used expert by a prefix sum over the counts, as the full-precision kernel does."""


def options(q: QuantProj, blocks: dict | None) -> dict:
    """``BLOCKS`` updated with ``blocks`` (e.g. tiles tuned for the full-precision kernel), checked for ``q``'s
    format: a ValueError names an option this kernel cannot run rather than computing something else."""
    opts = {**BLOCKS, **(blocks or {})}
    per = 8 // q.bits
    name = {KIND_FP8: "fp8", KIND_MX: "mxfp4"}.get(q.kind, f"int{q.bits}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
        v = opts[key]
        if v < 16 or v & (v - 1):
            raise ValueError(
                f"quantised slot kernel: {key} {v} must be a power of two of at least 16 (tl.dot)"
            )
    if opts["BLOCK_D"] // per < 16:
        raise ValueError(
            f"quantised slot kernel: BLOCK_D {opts['BLOCK_D']} holds {opts['BLOCK_D'] // per} bytes of {name} "
            f"codes per output, tl.dot needs 16: use BLOCK_D >= {16 * per} for {name} rows"
        )
    if q.d % per:
        raise ValueError(f"quantised slot kernel: {q.d} inputs do not pack whole into {name} bytes")
    return opts


MAGICS = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
"""The fast integer path's constant per input dtype: (its bits, MAGIC); ``bits | q`` is MAGIC + q exactly for q < 128
(bf16) or q < 1024 (fp16)."""


def fast(q: QuantProj, opts: dict, dtype: torch.dtype) -> bool:
    """Whether the kernel takes the fast integer path (module docstring) for ``q`` with tiles ``opts`` and inputs
    of ``dtype``: integer codes below 128 (at most 4 bits), each D-tile within one group, bf16 or fp16 inputs."""
    return q.kind == KIND_INT and q.bits <= 4 and q.group % opts["BLOCK_D"] == 0 and dtype in MAGICS


def slot_linear_quant(
    x: torch.Tensor,  # [R, D]
    y: torch.Tensor,  # [P, N]
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # order [P], counts [E], starts [E] (int32)
    slot: torch.Tensor,  # [E] int32
    claim: torch.Tensor,  # [E] int32
    pool: torch.Tensor,  # [S, nbytes] uint8 slot pool
    host: torch.Tensor,  # [L*E, nbytes] uint8 pinned host pool
    host_row0: int,
    q: QuantProj,
    bias_off: int | None,  # byte offset of the raw float32 bias
    k: int,
    pair_rows: bool,
    fill: bool,
    blocks: dict | None = None,
) -> None:
    order, counts, starts = groups
    opts = options(q, blocks)
    assert pool.dtype == torch.uint8 and host.dtype == torch.uint8 and x.shape[1] == q.d and y.shape[1] == q.n
    delta = host.data_ptr() - pool.data_ptr()
    assert delta % 16 == 0 and pool.stride(0) % 16 == 0, "expert rows must start 16-byte aligned"
    num_experts = counts.shape[0]
    compact = bool(opts.pop("COMPACT"))
    grid = (min(num_experts, order.shape[0]) if compact else num_experts, triton.cdiv(q.n, opts["BLOCK_N"]))
    magic_bits, magic = MAGICS.get(x.dtype, (0, 0.0))
    _slot_linear_quant[grid](
        x, x.stride(0), y, y.stride(0), order, counts, starts, slot, claim, pool, delta, host_row0,
        pool.stride(0), q.codes, q.scale, max(q.zero, 0), bias_off if bias_off is not None else 0,
        q.n, k, q.group, q.groups, num_experts, D=q.d, FP8=q.kind == KIND_FP8, MX=q.kind == KIND_MX, BITS=q.bits, PER=8 // q.bits,
        MASK=2**q.bits - 1, SCALE_F16=bool(q.scale_f16), ONE_GROUP=q.group % opts["BLOCK_D"] == 0,
        FAST=fast(q, opts, x.dtype), MAGIC_BITS=magic_bits, MAGIC=magic,
        PAIR_ROWS=pair_rows, HAS_BIAS=bias_off is not None, COMPACT=compact,
        E_POW2=triton.next_power_of_2(num_experts), FILL=fill, IEEE=x.dtype == torch.float32,
        **opts,
    )  # fmt: skip
