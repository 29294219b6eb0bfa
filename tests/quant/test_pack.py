"""Bit packing: pack then unpack gives the codes back, at the promised size, for every width and length."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow.quant.pack import pack, packed_bytes, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), count=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_round_trip_and_size(bits: int, count: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (count,), generator=gen, dtype=torch.uint8)
    data = pack(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == packed_bytes(count, bits)
    assert torch.equal(unpack(data, bits, count), codes)


def test_batched_unpack_reads_each_row() -> None:
    rows = torch.randint(0, 8, (3, 40), dtype=torch.uint8)
    data = torch.stack([pack(r, 3) for r in rows])
    assert torch.equal(unpack(data, 3, 40), rows)


def test_packed_sizes() -> None:
    assert [packed_bytes(128, b) for b in (8, 4, 3, 2)] == [128, 64, 48, 32]
