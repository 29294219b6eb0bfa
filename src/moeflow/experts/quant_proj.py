"""Where one projection's quantised weight sits in a :class:`~moeflow.quant.row.RowCodec` row, as the flat list of
ints the ``moeflow::slot_linear_quant`` op takes, and the torch reference that dequantises it from a row.

A quantised 2-D parameter is stored [N out, D in] row-major (transposed first when the family keeps it [in, out]):
``codes`` (integers packed ``8 // bits`` per byte, lowest bits first, one e4m3 byte each, or two e2m1 codes per
byte for MXFP4), then ``scale`` [N, G] (+ ``offset`` [N, G] for integers; e8m0 bytes for MXFP4, groups of 32), group
``g`` along D. Biases are raw float32. Offsets are bytes into the row.
Supported here: fp8, MXFP4 and the integer formats whose codes pack whole into bytes (int8, int4, int2).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from moeflow.quant import fit
from moeflow.quant.formats import group_of
from moeflow.quant.pack import unpack
from moeflow.quant.row import RowCodec

SLOT_FORMATS = ("fp8", "int8", "int4", "int2", "mxfp4")
"""Row formats the slot-table experts (static and graph decode) compute with."""

KIND_INT, KIND_FP8, KIND_MX = 0, 1, 2


@dataclass(frozen=True)
class QuantProj:
    """One quantised weight inside an expert row (byte offsets)."""

    kind: int
    """KIND_INT (w = q * scale + offset), KIND_FP8 (w = e4m3 * scale) or KIND_MX (w = e2m1 * 2**(e8m0 - 127))."""
    bits: int
    codes: int
    scale: int
    zero: int
    """Offset of the integer zero points (-1 for fp8)."""
    scale_f16: int
    """1: scale and zero are float16, 0: float32."""
    group: int
    groups: int
    """G, groups per output row."""
    n: int
    d: int

    def as_list(self) -> list[int]:
        return list(astuple(self))

    @staticmethod
    def of_list(values: list[int]) -> QuantProj:
        return QuantProj(*values)


def unsupported(codec: RowCodec) -> str | None:
    """Why the slot-table experts cannot run rows of ``codec`` (None: they can)."""
    name = codec.fmt.name
    if name not in SLOT_FORMATS:
        return f"{name} experts"
    for c in codec.params:
        if c.fmt is None:
            if c.pieces[0].offset % 4:
                return f"{name} experts with {c.param.name} at a misaligned offset"
            continue
        d = c.matrix[1]
        size = c.fmt.param_dtype.itemsize
        if d % (8 // c.fmt.bits) or any(p.offset % size for p in c.pieces if p.name != "codes"):
            return f"{name} experts with {c.param.name} of shape {c.param.shape}"
    return None


def precopy_default(codec: RowCodec | None) -> int:
    """The ``PRECOPY`` option a layer runs with when ``blocks`` does not set it: 1 for integer rows, 0 otherwise.

    Measured on the H200 (``decode-floor-quant-precopy-s29-h200.json``, ``decode-floor-mixtral-int4-precopy-s29-
    h200.json``): the int4 kernel's own zero-copy reads of its misses fall behind the link (it dequantises as it
    reads), so copying the claimed misses into their slots first by the bandwidth-bound copy kernel made int4 decode
    at batch 1, 25% cached, 1.13x faster (OLMoE, expertflow-reuse: 8.99 -> 7.95 ms) and 1.25x (Mixtral, LRU: 35.96 ->
    28.80 ms); bf16 rows gained nothing (within 1%), and fp8 (one conversion per code) already reads at link speed.
    """
    return int(codec is not None and codec.fmt.kind == "int")


def quant_proj(codec: RowCodec, name: str) -> QuantProj:
    """The quantised weight ``name`` of ``codec``'s rows."""
    c = codec.param(name)
    fmt = c.fmt
    assert fmt is not None and fmt.name in SLOT_FORMATS, name
    n, d = c.matrix
    scale = c.piece("scale")
    if fmt.kind == "fp8":
        kind, zero = KIND_FP8, -1
    elif fmt.kind == "mxfp4":
        kind, zero = KIND_MX, -1
    else:
        kind, zero = KIND_INT, c.piece("offset").offset
    return QuantProj(kind, fmt.bits, c.piece("codes").offset, scale.offset, zero,
                     int(scale.dtype == torch.float16), group_of(fmt, d), scale.shape[1], n, d)  # fmt: skip


def raw_offset(codec: RowCodec, name: str | None) -> int | None:
    """Byte offset of the raw float32 parameter ``name`` (a bias) in the row; None for no name."""
    return codec.param(name).pieces[0].offset if name else None


def dequant(row: torch.Tensor, q: QuantProj) -> torch.Tensor:
    """The weight [N, D] float32 of ``q`` from one quantised row (uint8 [nbytes])."""
    n, d = q.n, q.d
    sdtype = torch.float16 if q.scale_f16 else torch.float32
    sbytes = n * q.groups * sdtype.itemsize

    def params(off: int) -> torch.Tensor:
        return row[off : off + sbytes].view(sdtype).view(n, q.groups)

    if q.kind == KIND_FP8:
        return fit.dequant_fp8(row[q.codes : q.codes + n * d].view(n, d), params(q.scale), q.group)
    if q.kind == KIND_MX:
        scales = row[q.scale : q.scale + n * q.groups].view(n, q.groups)
        return fit.dequant_mxfp4(row[q.codes : q.codes + n * d // 2].view(n, d // 2), scales)
    per = 8 // q.bits
    codes = unpack(row[q.codes : q.codes + n * d // per], q.bits, n * d).view(n, d)
    return fit.dequant_int(codes, params(q.scale), params(q.zero), d)


def raw(row: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """``count`` raw float32 values at byte ``offset`` of a quantised row."""
    return row[offset : offset + 4 * count].view(torch.float32)


def project_quant(
    row: torch.Tensor,  # [nbytes] one expert's quantised row
    x: torch.Tensor,  # [R, D]
    pairs: torch.Tensor,  # [M] pair ids of this expert
    q: QuantProj,
    bias: int | None,
    k: int,
    pair_rows: bool,
) -> torch.Tensor:  # [M, N]
    """One expert's projection of its pairs' inputs from its quantised row (the torch reference of the quantised
    kernel: the weight dequantised to the compute dtype, as the eager path computes with it)."""
    w = dequant(row, q).to(x.dtype)
    rows = pairs.long() if pair_rows else pairs.long() // k
    y = x[rows] @ w.T
    return y + raw(row, bias, q.n).to(x.dtype) if bias is not None else y
