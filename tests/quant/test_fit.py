"""Round-trip error of every format within its known bound.

Integers: per group, the root-mean-square error is at most half a step of the min-max grid (range / (2**bits - 1)
/ 2), the worst case of plain rounding, since the fit keeps min-max rounding as a candidate and only improves on it;
and the fit is no worse than min-max rounding over the whole matrix. fp8 e4m3 (3 mantissa bits): each weight within
2**-4 of itself relative (half an ulp), or 2**-10 of its group's scale in the subnormal range. MXFP4: each weight within
half the widest e2m1 step of its block (1 at the top binade, times the block's power-of-two scale).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow.quant import fit
from moeflow.quant.formats import FORMATS, group_of

weights = st.tuples(
    st.sampled_from([(4, 64), (8, 144), (3, 24), (16, 256)]),
    st.floats(1e-3, 10.0),
    st.integers(0, 2**16),
    st.sampled_from(["normal", "heavy", "offset"]),
)


def _matrix(shape: tuple[int, int], scale: float, seed: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * scale
    if kind == "heavy":  # outliers, as real weights have
        w = w * torch.empty(shape).exponential_(generator=gen) ** 2
    if kind == "offset":  # groups far from zero
        w = w + 3 * scale
    return w


@settings(max_examples=40, deadline=None)
@given(spec=weights, name=st.sampled_from(["int8", "int4", "int3", "int2"]))
def test_int_error_within_half_a_minmax_step(spec: tuple, name: str) -> None:
    fmt = FORMATS[name]
    w = _matrix(*spec)
    q, s, m = fit.fit_int(w, fmt)
    assert q.dtype == torch.uint8 and int(q.max()) <= fmt.levels
    back = fit.dequant_int(q, s, m, w.shape[1])
    g = group_of(fmt, w.shape[1])
    x, err = w.reshape(-1, g), (back - w).reshape(-1, g)
    step = (x.amax(1) - x.amin(1)) / fmt.levels
    rms = err.square().mean(1).sqrt()
    bound = step / 2 * 1.02 + 2**-10 * x.abs().amax(1)  # parameters are rounded to their storage dtype
    assert bool((rms <= bound).all()), (rms / bound).max()
    minmax = ((x - x.amin(1, keepdim=True)) / step[:, None]).round() * step[:, None] + x.amin(1, keepdim=True)
    assert err.square().sum() <= (minmax - x).square().sum() * 1.01 + 1e-12


def test_fit_beats_minmax_at_low_bits() -> None:
    w = _matrix((64, 256), 0.02, 0, "heavy")
    for name in ("int4", "int3", "int2"):
        fmt = FORMATS[name]
        q, s, m = fit.fit_int(w, fmt)
        ours = (fit.dequant_int(q, s, m, 256) - w).square().sum()
        x = w.reshape(-1, group_of(fmt, 256))
        step = ((x.amax(1) - x.amin(1)) / fmt.levels)[:, None]
        plain = ((x - x.amin(1, keepdim=True)) / step).round() * step + x.amin(1, keepdim=True)
        assert ours < 0.9 * (plain - x).square().sum(), name


@settings(max_examples=40, deadline=None)
@given(spec=weights, group=st.sampled_from([32, 128]))
def test_fp8_error_within_half_an_ulp(spec: tuple, group: int) -> None:
    w = _matrix(*spec)
    codes, scale = fit.fit_fp8(w, group)
    assert scale.shape == (w.shape[0], -(-w.shape[1] // group))
    back = fit.dequant_fp8(codes, scale, group)
    s = scale.repeat_interleave(group, dim=-1)[:, : w.shape[1]]
    bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
    assert bool(((back - w).abs() <= bound).all())


@settings(max_examples=30, deadline=None)
@given(spec=weights)
def test_mxfp4_error_within_half_a_step(spec: tuple) -> None:
    shape, scale, seed, kind = spec
    if shape[1] % 32:
        shape = (shape[0], 64)
    w = _matrix(shape, scale, seed, kind)
    blocks, scales = fit.fit_mxfp4(w)
    back = fit.dequant_mxfp4(blocks, scales)
    unit = torch.exp2(scales.to(torch.float32) - 127).repeat_interleave(32, dim=-1)
    assert bool(((back - w).abs() <= unit * 1.0 + 1e-30).all())  # widest e2m1 step is 2 (4 -> 6): half is 1


def test_mxfp4_decodes_transformers_layout() -> None:
    """Low nibble first, e8m0 scales biased by 127: the byte 0x21 in a block of scale 128 is (0.5, 1.0) * 2."""
    blocks = torch.full((1, 16), 0x21, dtype=torch.uint8)
    scales = torch.tensor([[128]], dtype=torch.uint8)
    assert fit.dequant_mxfp4(blocks, scales)[0, :2].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name", ["int4", "fp8"])
def test_zero_and_constant_groups_are_exact(name: str) -> None:
    w = torch.zeros(2, 128)
    w[1] = 0.25
    fmt = FORMATS[name]
    if fmt.kind == "int":
        back = fit.dequant_int(*fit.fit_int(w, fmt), 128)
    else:
        back = fit.dequant_fp8(*fit.fit_fp8(w, 128), 128)
    assert torch.equal(back, w)
