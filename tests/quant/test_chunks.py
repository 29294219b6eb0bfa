"""Quantising in chunks bounded in bytes (``RowCodec.encode_many``'s ``chunk_bytes``) gives the rows of one fit over
everything, byte for byte, in every format: whole experts per chunk, and one expert's output rows per chunk (the
last chunk short, 3-bit words and transposed layouts included); ``read_rows`` on a checkpoint gives the rows of
quantising each expert alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.model.layout import ExpertLayout, ParamSlice
from moeflow.model.loader import open_model
from moeflow.model.rows import read_rows
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import FIT_CHUNK_BYTES, RowCodec

LAYOUT = ExpertLayout(
    (ParamSlice("gate_up_proj", (192, 64), 0), ParamSlice("down_proj", (64, 96), 12288),
     ParamSlice("down_proj_bias", (64,), 18432)),
    18496,
)  # fmt: skip
EXPERT_GATE_UP = 192 * 64 * 4
"""float32 bytes of one expert's largest matrix."""


@pytest.mark.parametrize("name", ["int4", "int2", "int3", "int8", "fp8", "mxfp4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_chunked_encoding_equals_one_fit(name: str, transposed: bool) -> None:
    codec = RowCodec(LAYOUT, FORMATS[name], transposed)
    gen = torch.Generator().manual_seed(3)
    flats = torch.randn(5, LAYOUT.numel, generator=gen) * torch.rand(5, 1, generator=gen)
    whole = codec.encode_many(flats, chunk_bytes=1 << 40)
    assert whole.any()
    # 8-row chunks, 40-row chunks (192 = 4 * 40 + 32), one expert, three experts (5 = 3 + 2)
    for chunk in (1, 40 * 64 * 4, EXPERT_GATE_UP, 3 * EXPERT_GATE_UP):
        assert torch.equal(codec.encode_many(flats, chunk_bytes=chunk), whole), (name, chunk)
    # written in place: every byte of every piece
    out = torch.full((5, codec.nbytes), 0xAB, dtype=torch.uint8)
    codec.encode_many(flats, out, chunk_bytes=1)
    end = codec.params[-1].pieces[-1].offset + codec.params[-1].pieces[-1].nbytes  # then the row's padding
    assert torch.equal(out[:, :end], whole[:, :end])


def test_rows_fall_on_whole_bytes() -> None:
    """An expert larger than the chunk is cut into output rows whose packed codes start on a byte (3-bit words
    hold 8 codes): cutting 64-input int3 rows anywhere else would split a word."""
    codec = RowCodec(LAYOUT, FORMATS["int3"])
    flats = torch.randn(1, LAYOUT.numel)
    whole = codec.encode_many(flats, chunk_bytes=1 << 40)
    for chunk in (7 * 64 * 4, 13 * 64 * 4):  # 7 and 13 rows asked: 8 rows per chunk taken
        assert torch.equal(codec.encode_many(flats, chunk_bytes=chunk), whole)


def test_read_rows_equals_quantising_each_expert(checkpoints: dict[str, Path]) -> None:
    lm = open_model(str(checkpoints["olmoe"]), torch.device("cpu"), "float32", "int4")
    codec = lm.codecs.host
    assert codec is not None and lm.layout.numel * 4 * lm.num_experts < FIT_CHUNK_BYTES
    experts = list(range(lm.num_experts))
    rows = torch.zeros(lm.num_experts, codec.nbytes, dtype=torch.uint8)
    assert read_rows(lm, 0, experts, rows, codec) > 0
    for e in experts:
        full = torch.empty(lm.layout.numel)
        lm.read_full(0, e, full)
        assert torch.equal(rows[e], codec.encode(full)), e
