"""The byte layout of one quantised expert row: every parameter of an expert, back to back, as uint8.

A 2-D parameter is stored [N out, D in] (transposed first when the family keeps it [in, out], as gpt-oss does) in
pieces: ``codes`` (packed integers, e4m3 bytes or MXFP4 nibbles) and ``scale`` (+ ``offset`` for integers); any other
parameter (biases) is stored raw in float32. :meth:`RowCodec.decode` turns rows back into the flat compute-dtype
rows of the model's :class:`~moeflow.model.layout.ExpertLayout`, so the expert functions run unchanged on them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.quant import fit
from moeflow.quant.formats import QuantFormat, group_of
from moeflow.quant.pack import pack, packed_bytes, unpack

FIT_CHUNK_BYTES = 256 << 20
"""Most float32 weight bytes one quantisation fit takes at once: bounds the memory of quantising experts at load
(the integer fit's temporaries peak near 5x this, ~1.3 GB; MXFP4 is read as stored, not fitted at load). On a GPU
the slot pool is allocated first; sized automatically it leaves 10% of the free memory plus the 5% KV reserve, ~3 GB
on a 24 GB card, so a Mixtral-size expert (176M parameters, 704 MB in float32) is fitted in pieces well within that
(should a hand-sized pool leave less, the fit falls back to the CPU with a warning)."""

if TYPE_CHECKING:  # the model package uses this one, not the other way round
    from moeflow.model.layout import ExpertLayout, ParamSlice


@dataclass(frozen=True)
class Piece:
    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ParamCodec:
    """How one parameter sits in the row."""

    param: ParamSlice
    fmt: QuantFormat | None
    """None: stored raw (float32)."""
    transposed: bool
    pieces: tuple[Piece, ...]

    @property
    def matrix(self) -> tuple[int, int]:
        """(N out, D in) of the stored matrix."""
        a, b = self.param.shape
        return (b, a) if self.transposed else (a, b)

    def piece(self, name: str) -> Piece:
        return next(p for p in self.pieces if p.name == name)


def _pieces(param: ParamSlice, fmt: QuantFormat | None, transposed: bool, offset: int) -> list[Piece]:
    if fmt is None or len(param.shape) != 2:
        return [Piece("raw", offset, param.numel * 4, param.shape, torch.float32)]
    a, b = param.shape
    n, d = (b, a) if transposed else (a, b)
    if fmt.kind == "int":
        groups = d // group_of(fmt, d)
        specs = [("codes", packed_bytes(n * d, fmt.bits), (packed_bytes(n * d, fmt.bits),), torch.uint8),
                 ("scale", 0, (n, groups), fmt.param_dtype), ("offset", 0, (n, groups), fmt.param_dtype)]  # fmt: skip
    elif fmt.kind == "fp8":
        specs = [
            ("codes", n * d, (n, d), torch.uint8),
            ("scale", 0, (n, fit.fp8_groups(d, fmt.group)), torch.float32),
        ]
    else:  # mxfp4
        if d % 32:
            raise ValueError(f"MXFP4 needs an input size divisible by 32, got {d}")
        specs = [
            ("codes", n * d // 2, (n, d // 2), torch.uint8),
            ("scale", n * d // 32, (n, d // 32), torch.uint8),
        ]
    out = []
    for name, nbytes, shape, dtype in specs:
        nbytes = nbytes or math.prod(shape) * dtype.itemsize
        out.append(Piece(name, offset, nbytes, shape, dtype))
        offset += nbytes
    return out


class RowCodec:
    """Quantised rows of one model's experts in format ``fmt`` (every 2-D parameter; others raw)."""

    def __init__(self, layout: ExpertLayout, fmt: QuantFormat, transposed: bool = False):
        self.layout, self.fmt, self.transposed = layout, fmt, transposed
        params, offset = [], 0
        for p in layout.params:
            pieces = _pieces(p, fmt, transposed, offset)
            offset = pieces[-1].offset + pieces[-1].nbytes
            params.append(ParamCodec(p, fmt if pieces[0].name != "raw" else None, transposed, tuple(pieces)))
        self.params: tuple[ParamCodec, ...] = tuple(params)
        self.nbytes = (offset + 15) // 16 * 16  # rows start 16-byte aligned
        """Bytes of one row."""

    def param(self, name: str) -> ParamCodec:
        return next(c for c in self.params if c.param.name == name)

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One expert's flat full-precision row [numel] -> its quantised row uint8 [nbytes]."""
        return self.encode_many(flat[None], None if out is None else out[None])[0]

    def encode_many(
        self,
        flats: torch.Tensor,
        out: torch.Tensor | None = None,
        device: torch.device | None = None,
        chunk_bytes: int = FIT_CHUNK_BYTES,
    ) -> torch.Tensor:
        """Flat full-precision rows [R, numel] -> quantised rows uint8 [R, nbytes] (fitted together: fast), a
        piece of at most ``chunk_bytes`` float32 weights at a time (whole experts, else output rows of one);
        ``device``: fit there, the pieces copied back into ``out`` (on the CPU), else fit where ``flats`` are."""
        r = flats.shape[0]
        out = torch.zeros(r, self.nbytes, dtype=torch.uint8) if out is None else out
        for c in self.params:
            value = flats[:, c.param.offset : c.param.offset + c.param.numel].reshape(r, *c.param.shape)
            for experts, rows in _chunks(c, r, chunk_bytes):
                part = value[experts]
                if rows is not None:
                    part = part[:, :, rows] if c.transposed else part[:, rows]
                try:
                    parts = self.quantise(c, part if device is None else part.to(device))
                except torch.cuda.OutOfMemoryError:  # a slot pool sized to fill the GPU: fit the rest here
                    warnings.warn(
                        f"no GPU memory left for the {self.fmt.name} fit: fitting on the CPU", stacklevel=2
                    )
                    device = None
                    torch.cuda.empty_cache()
                    parts = self.quantise(c, part)
                self.write_many(out[experts], c, parts, rows)
        return out

    def quantise(self, c: ParamCodec, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pieces of parameter ``c`` holding ``value`` [R, *model shape] (or some of its output rows: the
        stored matrix's N out dimension cut), each [R, ...]."""
        r = value.shape[0]
        if c.fmt is None:
            return {"raw": value.to(torch.float32)}
        w = value.transpose(1, 2) if c.transposed else value
        n, d = w.shape[1:]
        w = w.reshape(r * n, d)
        if c.fmt.kind == "int":
            q, s, m = fit.fit_int(w, c.fmt)
            codes = pack(q.reshape(r, -1), c.fmt.bits, batched=True)
            return {"codes": codes, "scale": s.reshape(r, -1), "offset": m.reshape(r, -1)}
        if c.fmt.kind == "fp8":
            q, s = fit.fit_fp8(w, c.fmt.group)
        else:
            q, s = fit.fit_mxfp4(w)
        return {"codes": q.reshape(r, -1), "scale": s.reshape(r, -1)}

    def write(self, out: torch.Tensor, c: ParamCodec, parts: dict[str, torch.Tensor]) -> None:
        """Store ``parts`` (piece name -> tensor of the piece's shape, any dtype of its size) into row ``out``."""
        self.write_many(out[None], c, {k: v[None] for k, v in parts.items()})

    def write_many(
        self, out: torch.Tensor, c: ParamCodec, parts: dict[str, torch.Tensor], rows: slice | None = None
    ) -> None:
        """:meth:`write` for rows ``out`` [R, nbytes], each part [R, ...]; ``rows``: the parts hold only these
        output rows of the stored matrix (a start that is a multiple of 8, so packed codes start a whole byte)."""
        r = out.shape[0]
        for piece in c.pieces:
            lo, hi = (0, piece.nbytes) if rows is None else _row_bytes(c, piece, rows)
            data = parts[piece.name].to(piece.dtype).contiguous().reshape(r, -1).view(torch.uint8)
            if data.shape[1] != hi - lo:
                raise ValueError(
                    f"{c.param.name}.{piece.name}: {data.shape[1]} bytes for a piece of {hi - lo}"
                )
            out[:, piece.offset + lo : piece.offset + hi].copy_(data)

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Quantised rows uint8 [R, nbytes] -> flat rows [R, numel] in ``dtype`` (the layout's views apply)."""
        out = torch.empty(rows.shape[0], self.layout.numel, dtype=dtype, device=rows.device)
        for c in self.params:
            p = c.param
            out[:, p.offset : p.offset + p.numel] = (
                self.dequantise(c, rows).reshape(rows.shape[0], -1).to(dtype)
            )
        return out

    def dequantise(self, c: ParamCodec, rows: torch.Tensor) -> torch.Tensor:
        """Parameter ``c`` of every row, float32 [R, *model shape]."""
        r = rows.shape[0]
        get = {pc.name: _view(rows, pc, r) for pc in c.pieces}
        if c.fmt is None:
            return get["raw"]
        n, d = c.matrix
        if c.fmt.kind == "int":
            codes = unpack(get["codes"], c.fmt.bits, n * d).view(r, n, d)
            w = fit.dequant_int(codes, get["scale"], get["offset"], d)
        elif c.fmt.kind == "fp8":
            w = fit.dequant_fp8(get["codes"], get["scale"], c.fmt.group)
        else:
            w = fit.dequant_mxfp4(get["codes"], get["scale"])
        return w.transpose(1, 2) if c.transposed else w


def _chunks(c: ParamCodec, r: int, chunk_bytes: int) -> Iterator[tuple[slice, slice | None]]:
    """(experts, output rows or None for all) of ``c`` in pieces of at most ``chunk_bytes`` float32 weights: whole
    experts while one fits, else one expert's rows in multiples of 8 (so each piece's packed codes are whole bytes,
    3-bit words included); at least 8 rows, whatever ``chunk_bytes``."""
    per_expert = c.param.numel * 4
    if c.fmt is None or per_expert <= chunk_bytes:
        step = max(1, chunk_bytes // max(per_expert, 1))
        yield from ((slice(e, min(e + step, r)), None) for e in range(0, r, step))
        return
    n, d = c.matrix
    step = max(8, chunk_bytes // (d * 4) // 8 * 8)
    for e in range(r):
        yield from ((slice(e, e + 1), slice(n0, min(n0 + step, n))) for n0 in range(0, n, step))


def _row_bytes(c: ParamCodec, piece: Piece, rows: slice) -> tuple[int, int]:
    """The byte range of ``piece`` holding output rows ``rows`` of the stored matrix (every piece is row-major in
    the output rows; integer codes are packed over the flat [N, D] code array)."""
    n, d = c.matrix
    assert c.fmt is not None and rows.start % 8 == 0, (c.param.name, rows)
    if piece.name == "codes" and c.fmt.kind == "int":
        return packed_bytes(rows.start * d, c.fmt.bits), packed_bytes(rows.stop * d, c.fmt.bits)
    per_row = piece.nbytes // n
    return rows.start * per_row, rows.stop * per_row


def _view(rows: torch.Tensor, piece: Piece, r: int) -> torch.Tensor:
    data = rows[:, piece.offset : piece.offset + piece.nbytes]
    if piece.dtype != torch.uint8:
        data = data.contiguous().view(piece.dtype)
    return data.reshape(r, *piece.shape)
