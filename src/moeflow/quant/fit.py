"""Quantise and dequantise one 2-D weight [N out, D in] in each format; groups run along the input dimension.

Integer formats: ``w ≈ scale * q + offset`` per group, q in [0, 2**bits). The fit is calibration free and
error minimising, by alternating least squares (a Lloyd iteration for a uniform grid): given the grid, the nearest
codes are the best codes; given the codes, the best (scale, offset) is the closed-form least-squares line through
(q, w). Each half-step is an exact minimisation of the group's squared error, so the error never grows; a few clip
ratios of the min-max range seed it (at 2-4 bits shrinking the range often wins, as in AWQ's and GPTQ's clip search),
and each candidate is scored with its parameters already rounded to their storage dtype, so the best one kept is at
least as good as plain min-max rounding. We chose this over HQQ's half-quadratic solver because HQQ minimises an
l_p (p < 1) norm to tolerate outliers while moving only the zero point: our target is the squared error of the
dequantised weight (what the layer's output error follows), which alternating least squares minimises directly,
both scale and offset included, in a few vectorised passes with no hyper-parameters to tune.
"""

from __future__ import annotations

import torch

from moeflow.quant.formats import QuantFormat, group_of

CLIPS_LOW_BITS = (1.0, 0.9, 0.8, 0.7)
"""Shares of the min-max range tried as starting grids at 4 bits and below (1.0 alone at 8 bits)."""
ITERATIONS = 4
"""Alternating least-squares passes per starting grid."""

FP8_MAX = 448.0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""e2m1 values of the 16 MXFP4 codes (bit 3 is the sign)."""


# ------------------------------------------------------------------------------------------------ integers
def fit_int(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, D] -> codes uint8 [N, D], scale and offset [N, D // g] (``fmt.param_dtype``)."""
    n, d = w.shape
    g = group_of(fmt, d)
    # [M, g] one group per row, contiguous: sums over a strided view run in another order (other last bits)
    x = w.detach().to(torch.float32).reshape(-1, g).contiguous()
    levels = fmt.levels
    lo, hi = x.amin(1), x.amax(1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_m = torch.zeros_like(lo), torch.zeros_like(lo)
    for ratio in CLIPS_LOW_BITS if fmt.bits <= 4 else (1.0,):
        m = mid - half * ratio
        s = (2 * half * ratio / levels).clamp_min(1e-8)
        for _ in range(ITERATIONS + 1):
            s_r, m_r = _stored(s, fmt), _stored(m, fmt)
            q = _codes(x, s_r, m_r, levels)
            err = (q * s_r[:, None] + m_r[:, None] - x).square().sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s_r, best_s), torch.where(better, m_r, best_m)
            s, m = _least_squares(x, q, s, m)
    q = _codes(x, best_s, best_m, levels)
    shape = (n, d // g)
    return (
        q.to(torch.uint8).reshape(n, d),
        best_s.to(fmt.param_dtype).reshape(shape),
        best_m.to(fmt.param_dtype).reshape(shape),
    )


def _stored(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return v.to(fmt.param_dtype).to(torch.float32)


def _codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return ((x - m[:, None]) / safe[:, None]).round().clamp(0, levels)


def _least_squares(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The line w = a q + b of least squared error through each group's (code, weight) pairs."""
    qm, xm = q.mean(1), x.mean(1)
    dq = q - qm[:, None]
    var = dq.square().mean(1)
    cov = (dq * (x - xm[:, None])).mean(1)
    ok = (var > 0) & (cov > 0)
    a = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s)
    b = torch.where(ok, xm - a * qm, m)
    return a, b


def dequant_int(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, columns: int) -> torch.Tensor:
    """codes [..., N, D] with scale/offset [..., N, D // g] -> float32 [..., N, D]."""
    g = columns // scale.shape[-1]
    s = scale.to(torch.float32).repeat_interleave(g, dim=-1)
    m = offset.to(torch.float32).repeat_interleave(g, dim=-1)
    return codes.to(torch.float32) * s + m


# ------------------------------------------------------------------------------------------------ fp8
def fp8_groups(columns: int, group: int) -> int:
    return (columns + group - 1) // group


def fit_fp8(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] -> e4m3 codes as uint8 [N, D] and float32 scales [N, ceil(D / group)] (group absmax / 448)."""
    n, d = w.shape
    groups = fp8_groups(d, group)
    x = w.detach().to(torch.float32)
    padded = torch.nn.functional.pad(x.abs(), (0, groups * group - d)).view(n, groups, group)
    scale = padded.amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (x / scale.repeat_interleave(group, dim=-1)[:, :d]).clamp(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequant_fp8(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """e4m3 codes (uint8) [..., N, D] with scales [..., N, G] -> float32 [..., N, D]."""
    d = codes.shape[-1]
    s = scale.to(torch.float32).repeat_interleave(group, dim=-1)[..., :d]
    return codes.view(torch.float8_e4m3fn).to(torch.float32) * s


# ------------------------------------------------------------------------------------------------ MXFP4
def fit_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] (D a multiple of 32) -> packed codes uint8 [N, D // 2] (low nibble first) and e8m0 scales uint8
    [N, D // 32]: the smallest shared exponent that clips nothing (amax / 2**e <= 6; OCP's floor(log2(amax)) - 2
    can saturate a block's largest weights), values rounded to the nearest e2m1."""
    n, d = w.shape
    x = w.detach().to(torch.float32).view(n, d // 32, 32)
    amax = x.abs().amax(-1)
    exp = torch.where(
        amax > 0, torch.ceil(torch.log2(amax.clamp_min(2.0**-126) / 6)), torch.full_like(amax, -127)
    )
    exp = exp.clamp(-127, 127)
    y = x / torch.exp2(exp)[..., None]
    magnitudes = torch.tensor(FP4_VALUES[:8], device=x.device)
    idx = (y.abs()[..., None] - magnitudes).abs().argmin(-1)  # nearest magnitude (ties: the smaller code)
    codes = (idx + 8 * (y < 0)).to(torch.uint8).view(n, d)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (exp + 127).to(torch.uint8)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed codes [..., N, D // 2] and e8m0 scales [..., N, D // 32] -> float32 [..., N, D]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # [..., N, D]
    exp = scales.to(torch.int32) - 127
    return torch.ldexp(vals, exp.repeat_interleave(32, dim=-1).to(torch.float32))
