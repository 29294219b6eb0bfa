"""The quantised slot-table kernel (Triton) equals the torch reference (rows dequantised by the codec) for fp8, MXFP4 and
the byte-packed integer formats, reading experts from slots and zero-copy from the host pool, and its read-through
fill writes the raw quantised row into the claimed slot: run in Triton's interpreter on the CPU (skipped where
Triton is not installed). The descriptor the kernel reads agrees with ``RowCodec.decode``."""

from __future__ import annotations

import textwrap

import pytest
import torch

from moeflow.experts.quant_proj import (
    SLOT_FORMATS,
    dequant,
    precopy_default,
    quant_proj,
    raw,
    raw_offset,
    unsupported,
)
from moeflow.model.layout import ExpertLayout, ParamSlice
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import RowCodec
from tests.experts.interpreted import needs_triton, run_interpreted


def layout(h: int, i: int, bias: bool) -> ExpertLayout:
    """An expert of hidden size ``h`` and intermediate ``i`` (gated), with or without biases."""
    shapes = [("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))]
    if bias:
        shapes += [("gate_up_proj_bias", (2 * i,)), ("down_proj_bias", (h,))]
    params, off = [], 0
    for name, shape in shapes:
        params.append(ParamSlice(name, shape, off))
        off += params[-1].numel
    return ExpertLayout(tuple(params), off)


@pytest.mark.parametrize("fmt", SLOT_FORMATS)
def test_descriptor_dequantises_as_the_codec(fmt: str) -> None:
    torch.manual_seed(0)
    lay = layout(160, 32 if fmt == "mxfp4" else 24, bias=True)  # MXFP4: inputs in blocks of 32
    codec = RowCodec(lay, FORMATS[fmt])
    assert unsupported(codec) is None
    flat = torch.randn(3, lay.numel)
    rows = codec.encode_many(flat)
    want = codec.decode(rows, torch.float32)
    for r in range(3):
        for p in lay.params:
            got = (dequant(rows[r], quant_proj(codec, p.name)) if len(p.shape) == 2
                   else raw(rows[r], raw_offset(codec, p.name), p.numel))  # fmt: skip
            assert torch.equal(got.reshape(-1), want[r, p.offset : p.offset + p.numel]), (fmt, p.name)


def test_precopy_is_the_default_for_integer_rows_only() -> None:
    """Integer rows copy their claimed misses into slots before computing (``PRECOPY``) unless ``blocks`` says
    otherwise; fp8, MXFP4 and full-precision rows read their misses zero-copy."""
    lay = layout(64, 32, bias=False)
    assert [precopy_default(RowCodec(lay, FORMATS[f])) for f in ("int8", "int4", "int2")] == [1, 1, 1]
    assert [precopy_default(RowCodec(lay, FORMATS[f])) for f in ("fp8", "mxfp4")] == [0, 0]
    assert precopy_default(None) == 0


def test_unsupported_formats_are_named() -> None:
    lay = layout(64, 32, bias=False)
    assert unsupported(RowCodec(lay, FORMATS["int3"])) == "int3 experts"
    assert unsupported(RowCodec(lay, FORMATS["mxfp4"])) is None


SCRIPT = textwrap.dedent(
    """
    import torch
    from moeflow.experts.ops import slot_linear_quant as op
    from moeflow.experts.quant_proj import quant_proj, raw_offset
    from moeflow.experts.slot_kernel_quant import fast as fast_path, options, slot_linear_quant as kernel
    from moeflow.quant.formats import FORMATS
    from moeflow.quant.row import RowCodec
    from tests.experts.test_slot_kernel_quant import layout

    def groups_of(ids, e):
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True).int()
        counts = torch.bincount(flat, minlength=e).int()
        return order, counts, (torch.cumsum(counts, 0) - counts).int()

    torch.manual_seed(0)
    L, E, K, T, S = 2, 4, 2, 40, 6
    every = tuple(range(E))
    cases = [(fmt, 160, 24, True, {"BLOCK_D": 64}, T, every) for fmt in ("fp8", "int4", "int8", "int2")]
    cases += [("int4", 128, 32, False, {"BLOCK_D": 64}, T, every),
              ("fp8", 128, 32, False, {"BLOCK_D": 32}, T, every), ("int2", 96, 16, True, {"BLOCK_D": 64}, T, every)]
    # COMPACT (programs for the used experts only; one token: 2 pairs, fewer programs than experts) and tiles
    # wider than a group or than the inputs (BLOCK_D 256 over 160 inputs), narrow and wide in N
    cases += [("int4", 160, 24, True, {"BLOCK_D": 128, "BLOCK_N": 16, "COMPACT": 1}, 1, (1, 2)),
              ("int2", 96, 16, True, {"BLOCK_D": 64, "BLOCK_N": 64, "COMPACT": 1}, 5, (1, 2, 3)),
              ("fp8", 160, 24, False, {"BLOCK_D": 256, "BLOCK_N": 32, "COMPACT": 1, "num_warps": 4}, T, every),
              ("int8", 128, 32, True, {"BLOCK_D": 32, "BLOCK_N": 32, "BLOCK_M": 32, "COMPACT": 1}, 3, (1, 3))]
    # int4 tiles within one group (fp16: the fast integer path, slot_kernel_quant.fast): a tile per group (BLOCK_D
    # 128 over two groups of 128, 64 over one of 64) and two tiles per group (BLOCK_D 64 over groups of 128)
    cases += [("int4", 256, 64, True, {"BLOCK_D": 128, "BLOCK_N": 32, "COMPACT": 1}, T, every),
              ("int4", 256, 64, False, {"BLOCK_D": 64, "BLOCK_N": 64}, T, every),
              ("int4", 128, 64, True, {"BLOCK_D": 128, "BLOCK_N": 64, "BLOCK_M": 32, "COMPACT": 1}, 3, (1, 3)),
              ("int4", 128, 64, False, {"BLOCK_D": 64, "BLOCK_N": 16, "num_warps": 4}, 1, (0, 1))]
    # MXFP4 (e2m1 codes, e8m0 scales per 32 inputs): a tile of two blocks, and a tile of four with COMPACT
    cases += [("mxfp4", 160, 32, True, {"BLOCK_D": 64}, T, every),
              ("mxfp4", 128, 64, False, {"BLOCK_D": 128, "BLOCK_N": 32, "COMPACT": 1}, 3, (1, 3))]
    taken = []
    for dtype in (torch.float32, torch.float16):  # the interpreter computes bf16 dots wrongly (GPU tests: bf16)
        for fmt, h, i, bias, blocks, t, used in cases:
            lay = layout(h, i, bias)
            codec = RowCodec(lay, FORMATS[fmt])
            host = codec.encode_many(torch.randn(L * E, lay.numel) * 0.1)
            layer = 1
            slot = torch.tensor([2, -1, 0, -1], dtype=torch.int32)  # experts 0 and 2 resident, 1 and 3 from host
            claim = torch.tensor([-1, 4, -1, -1], dtype=torch.int32)  # expert 1 fills slot 4
            hidden = torch.randn(t, h).to(dtype)
            pick = torch.tensor(used)
            ids = torch.stack([pick[torch.randperm(len(used))[:K]] for _ in range(t)])
            groups = groups_of(ids, E)
            outs, fast = [], []
            for use_kernel in (False, True):
                pool = torch.zeros(S, codec.nbytes, dtype=torch.uint8)
                pool[2], pool[0] = host[layer * E], host[layer * E + 2]
                x = hidden
                for name, b, pair_rows in (("gate_up_proj", "gate_up_proj_bias", False),
                                           ("down_proj", "down_proj_bias", True)):
                    q = quant_proj(codec, name)
                    b_off = raw_offset(codec, b if bias else None)
                    if use_kernel:
                        fast.append(fast_path(q, options(q, blocks), dtype))
                        y = (torch.zeros if pair_rows else torch.empty)(t * K, q.n, dtype=dtype)
                        kernel(x, y, groups, slot, claim, pool, host, layer * E, q, b_off, K, pair_rows, True,
                               blocks)
                    else:
                        y = op(x, *groups, slot, claim, pool, host, layer * E, q.as_list(),
                               -1 if b_off is None else b_off, K, pair_rows, True, [])
                    x = torch.nn.functional.silu(y[:, : q.n // 2]) * y[:, q.n // 2 :] if not pair_rows else y
                outs.append((x, pool))
            (y_ref, pool_ref), (y, pool) = outs
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
            assert y_ref.abs().max() > 0.01
            assert torch.equal(pool, pool_ref), (fmt, blocks)
            assert torch.equal(pool[4], host[layer * E + 1]) and not pool[[1, 3, 5]].any(), fmt
            taken += fast
    assert sum(taken) == 7  # fp16 int4 projections with a tile within one group take the fast path
    print("ok")
    """
)


@needs_triton
def test_quant_kernel_equals_torch_reference() -> None:
    run_interpreted(SCRIPT)


@needs_triton
def test_tiles_a_format_cannot_run_are_refused() -> None:
    """Tiles meant for the full-precision kernel reach this one too (one ``blocks`` dict): a BLOCK_D holding fewer
    than 16 code bytes per output, or a tile that is no power of two, is a ValueError, not a wrong result."""
    from moeflow.experts.slot_kernel_quant import BLOCKS, options

    lay = layout(128, 32, bias=False)
    int2, int4 = (quant_proj(RowCodec(lay, FORMATS[f]), "gate_up_proj") for f in ("int2", "int4"))
    assert options(int4, {"BLOCK_D": 32, "COMPACT": 1}) == {**BLOCKS, "BLOCK_D": 32, "COMPACT": 1}
    with pytest.raises(ValueError, match="BLOCK_D >= 64 for int2"):
        options(int2, {"BLOCK_D": 32})
    with pytest.raises(ValueError, match="BLOCK_N 24 must be a power of two"):
        options(int4, {"BLOCK_N": 24})


@needs_triton
def test_fast_path_constants_are_exact() -> None:
    """The fast integer path's constants (the bf16 one is not run by the interpreter): ``bits | q`` read as the
    dtype is exactly MAGIC + q for every code the path takes (q < 128), and the path is taken only for integer
    codes of at most 4 bits in a tile within one group, with bf16 or fp16 inputs."""
    from moeflow.experts.slot_kernel_quant import MAGICS, fast, options

    codes = torch.arange(128, dtype=torch.int16)
    for dtype, (bits, magic) in MAGICS.items():
        assert torch.equal((codes | bits).view(dtype).double(), magic + codes.double()), dtype
    lay = layout(256, 64, bias=False)
    q = {f: quant_proj(RowCodec(lay, FORMATS[f]), "gate_up_proj") for f in ("int4", "int8", "int2", "fp8")}
    assert q["int4"].group == 128

    def takes(fmt: str, block_d: int, dtype: torch.dtype) -> bool:
        return fast(q[fmt], options(q[fmt], {"BLOCK_D": block_d}), dtype)

    assert takes("int4", 128, torch.bfloat16) and takes("int4", 64, torch.float16)
    assert not takes("int4", 256, torch.bfloat16)  # two groups in a tile
    assert not takes("int4", 128, torch.float32)  # fp32 keeps the IEEE dequantising path
    assert not takes("int8", 128, torch.bfloat16) and not takes("fp8", 128, torch.bfloat16)
    assert not takes("int2", 64, torch.bfloat16)  # int2's group (32) is below its smallest tile
