"""Bit packing of integer codes: 8, 4 and 2 bits per code pack 1, 2 and 4 codes per byte (lowest bits first), 3 bits
pack 8 codes into 3 bytes (a 24-bit little-endian word). A code array is flattened and padded to whole words."""

from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits."""
    if bits == 3:
        return (count + 7) // 8 * 3
    per = 8 // bits
    return (count + per - 1) // per


def pack(codes: torch.Tensor, bits: int, batched: bool = False) -> torch.Tensor:
    """Codes (any shape, values in [0, 2**bits)) -> uint8 [packed_bytes(numel, bits)]; ``batched``: codes
    [R, ...] -> [R, packed_bytes(numel / R, bits)], each row packed on its own."""
    flat = codes.reshape(codes.shape[0] if batched else 1, -1).to(torch.int32)
    per = 8 if bits == 3 else 8 // bits
    pad = (-flat.shape[1]) % per
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.view(flat.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
    word = (words << shifts).sum(dim=-1, dtype=torch.int32)  # [R, W] one packed word per `per` codes
    if bits == 3:
        word = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1).reshape(word.shape[0], -1)
    out = word.to(torch.uint8)
    return out if batched else out.reshape(-1)


def unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., B] -> uint8 codes [..., count] (the inverse of :func:`pack`, batched over leading dims)."""
    lead = data.shape[:-1]
    x = data.to(torch.int32)
    if bits == 3:
        b = x.view(*lead, -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        per = 8
    else:
        word, per = x, 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=data.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*lead, -1)[..., :count].to(torch.uint8)
