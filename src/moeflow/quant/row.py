"""The byte layout of one quantised expert row: every parameter of an expert, back to back, as uint8.

A 2-D parameter is stored [N out, D in] (transposed first when the family keeps it [in, out], as gpt-oss does) in
pieces: ``codes`` (packed integers, e4m3 bytes or MXFP4 nibbles) and ``scale`` (+ ``offset`` for integers); any other
parameter (biases) is stored raw in float32. :meth:`RowCodec.decode` turns rows back into the flat compute-dtype
rows of the model's :class:`~moeflow.model.layout.ExpertLayout`, so the expert functions run unchanged on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.quant import fit
from moeflow.quant.formats import QuantFormat, group_of
from moeflow.quant.pack import pack, packed_bytes, unpack

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

    def encode_many(self, flats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat full-precision rows [R, numel] -> quantised rows uint8 [R, nbytes] (fitted together: fast)."""
        r = flats.shape[0]
        out = torch.zeros(r, self.nbytes, dtype=torch.uint8) if out is None else out
        for c in self.params:
            value = flats[:, c.param.offset : c.param.offset + c.param.numel].reshape(r, *c.param.shape)
            self.write_many(out, c, self.quantise(c, value))
        return out

    def quantise(self, c: ParamCodec, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pieces of parameter ``c`` holding ``value`` [R, *model shape], each [R, ...]."""
        r = value.shape[0]
        if c.fmt is None:
            return {"raw": value.to(torch.float32)}
        n, d = c.matrix
        w = (value.transpose(1, 2) if c.transposed else value).reshape(r * n, d)
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

    def write_many(self, out: torch.Tensor, c: ParamCodec, parts: dict[str, torch.Tensor]) -> None:
        """:meth:`write` for rows ``out`` [R, nbytes], each part [R, ...]."""
        r = out.shape[0]
        for piece in c.pieces:
            data = parts[piece.name].to(piece.dtype).contiguous().reshape(r, -1).view(torch.uint8)
            if data.shape[1] != piece.nbytes:
                raise ValueError(
                    f"{c.param.name}.{piece.name}: {data.shape[1]} bytes for a piece of {piece.nbytes}"
                )
            out[:, piece.offset : piece.offset + piece.nbytes].copy_(data)

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


def _view(rows: torch.Tensor, piece: Piece, r: int) -> torch.Tensor:
    data = rows[:, piece.offset : piece.offset + piece.nbytes]
    if piece.dtype != torch.uint8:
        data = data.contiguous().view(piece.dtype)
    return data.reshape(r, *piece.shape)
