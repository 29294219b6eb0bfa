"""A Triton kernel that reads expert weights straight from the slot pool by index (CUDA only).

For decode-sized batches the layer is memory bound: each (token, expert) pair needs one pass over its expert's
weights. ``_pair_gemv`` computes ``y[p] = W[slot[p]] @ x[row[p]]`` for all pairs of a layer in one launch, with
the weight addressed through the slot view's strides, so nothing is gathered or copied. A layer is: one launch for
gate/up, the family's gating (torch), one launch for down, then the weighted sum over top-k (torch).
Legend: P pairs (= T·K), N output features, D input features, S slots.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _pair_gemv(
    x_ptr,  # [R, D] inputs, row stride sx
    w_ptr,  # slot pool view: W[s, n, d] at s * sws + n * swn + d * swd
    row_ptr,  # [P] input row of each pair
    slot_ptr,  # [P] slot of each pair
    y_ptr,  # [P, N] output
    N,
    D,
    sx,
    sws,
    swn,
    swd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    row = tl.load(row_ptr + p)
    slot = tl.load(slot_ptr + p).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_base = w_ptr + slot * sws
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * sx + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        w = tl.load(
            w_base + offs_n[:, None] * swn + offs_d[None, :] * swd,
            mask=(offs_n[:, None] < N) & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + p * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def pair_linear(
    x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, transposed: bool
):
    """y[p] = x[rows[p]] @ W[slots[p]]^T (or ``@ W`` when ``transposed``): x [R, D], weight [S, N, D] or [S, D, N]."""
    s_stride, a, b = weight.stride()
    if transposed:  # weight [S, D, N]
        n, d, swn, swd = weight.shape[2], weight.shape[1], b, a
    else:  # weight [S, N, D]
        n, d, swn, swd = weight.shape[1], weight.shape[2], a, b
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    block_n, block_d = 32, 128
    grid = (rows.shape[0], triton.cdiv(n, block_n))
    _pair_gemv[grid](
        x, weight, rows, slots, y, n, d, x.stride(0), s_stride, swn, swd, BLOCK_N=block_n, BLOCK_D=block_d
    )
    return y


def triton_experts_forward(
    self: Any,  # SlotExperts: slot-pool views + the family's gating
    hidden: torch.Tensor,  # [T, H]
    slot_index: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, H]
    t, k = slot_index.shape
    hidden = hidden.contiguous()
    rows = torch.arange(t, device=hidden.device).repeat_interleave(k)  # [P]
    slots = slot_index.reshape(-1).to(torch.int32)  # [P]
    gate_up = pair_linear(hidden, self.gate_up_proj, rows, slots, self.is_transposed)  # [P, 2I]
    if self.has_bias:
        gate_up = gate_up + self.gate_up_proj_bias[slots.long()]
    act = self._apply_gate(gate_up).contiguous()  # [P, I]
    pair_rows = torch.arange(t * k, device=hidden.device)
    out = pair_linear(act, self.down_proj, pair_rows, slots, self.is_transposed)  # [P, H]
    if self.has_bias:
        out = out + self.down_proj_bias[slots.long()]
    out = out.float() * weights.reshape(-1, 1).float()
    return out.view(t, k, -1).sum(dim=1).to(hidden.dtype)
