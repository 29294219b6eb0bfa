"""Quantised expert rows: a row decodes to the per-parameter dequantised weights, biases stay exact, transposed
layouts quantise along their input dimension, and a row is smaller than the full-precision one."""

from __future__ import annotations

import pytest
import torch

from moeflow.model.layout import ExpertLayout, ParamSlice
from moeflow.quant import fit
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import RowCodec

LAYOUT = ExpertLayout(
    (ParamSlice("gate_up_proj", (48, 144), 0), ParamSlice("down_proj", (144, 24), 6912),
     ParamSlice("down_proj_bias", (144,), 10368)),
    10512,
)  # fmt: skip


@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_decodes_to_the_dequantised_parameters(name: str, transposed: bool) -> None:
    fmt = FORMATS[name]
    codec = RowCodec(LAYOUT, fmt, transposed)
    flat = torch.randn(LAYOUT.numel) * 0.02
    rows = torch.stack([codec.encode(flat), codec.encode(flat * 2)])
    assert rows.shape == (2, codec.nbytes) and codec.nbytes < LAYOUT.numel * 2
    back = codec.decode(rows, torch.float32)
    for p in LAYOUT.params[:2]:
        w = flat[p.offset : p.offset + p.numel].view(p.shape)
        m = w.t() if transposed else w
        if fmt.kind == "int":
            want = fit.dequant_int(*fit.fit_int(m, fmt), m.shape[1])
        else:
            want = fit.dequant_fp8(*fit.fit_fp8(m, fmt.group), fmt.group)
        want = want.t() if transposed else want
        assert torch.equal(back[0, p.offset : p.offset + p.numel].view(p.shape), want)
    assert torch.equal(back[:, 10368:], torch.stack([flat[10368:], flat[10368:] * 2]))  # raw float32


def test_transposed_groups_run_along_the_input_dimension() -> None:
    """[in, out] stored: one output column with a large scale must not spoil the other columns' groups."""
    w = torch.randn(64, 8) * 0.01  # [in 64, out 8]
    w[:, 0] *= 1000
    layout = ExpertLayout((ParamSlice("gate_up_proj", (64, 8), 0),), 512)
    back = (
        RowCodec(layout, FORMATS["int4"], transposed=True)
        .decode(
            RowCodec(layout, FORMATS["int4"], transposed=True).encode(w.reshape(-1))[None], torch.float32
        )[0]
        .view(64, 8)
    )
    assert (back[:, 1:] - w[:, 1:]).abs().max() < 0.01 * 0.5


def test_mxfp4_row_holds_native_blocks() -> None:
    layout = ExpertLayout((ParamSlice("down_proj", (64, 32), 0),), 2048)  # gpt-oss: [in 64, out 32]
    codec = RowCodec(layout, FORMATS["mxfp4"], transposed=True)
    w = torch.randn(32, 64)  # [out, in], as the blocks are stored
    blocks, scales = fit.fit_mxfp4(w)
    row = torch.zeros(codec.nbytes, dtype=torch.uint8)
    codec.write(row, codec.params[0], {"codes": blocks, "scale": scales})
    back = codec.decode(row[None], torch.float32)[0].view(64, 32)
    assert torch.equal(back, fit.dequant_mxfp4(blocks, scales).t())
