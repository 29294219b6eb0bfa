"""Experts found through a device-side slot table: the static decode step's MoE layer, with no host round trip.

For each layer: the routed (token, expert) pairs are grouped by expert with device ops (nothing waits for the
host, so the step can be captured in a CUDA graph); each used expert is read from its slot when ``table[l, e] >= 0``
and from the host pool otherwise; a missed expert claims one of the candidate slots the policy offered for the step
(see ``claims.py``) and is written into it as it is read (read-through fill). What happened is left on the device for
the host to read after the step: ``served[l, e]`` (1 hit, 2 miss) and ``filled[l, e]`` (the slot filled, or -1).

On CUDA the projections run in the Triton kernel of :mod:`moeflow.experts.slot_kernel`; elsewhere a torch
reference with the same semantics (and the same fills) runs expert by expert, reading misses from the store's
host tier (which may read the checkpoint). Legend: T tokens, K top-k, E experts, H hidden, I intermediate, P = T*K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeflow.experts.claims import route_layer
from moeflow.model.loader import ExpertLayout

HostRow = Callable[[int, int], torch.Tensor]
"""(layer, expert) -> that expert's flat row in host memory."""


@dataclass(frozen=True)
class SlotTensors:
    """Device state of the slot-table experts, allocated once (static addresses, so graphs can replay them)."""

    pool: torch.Tensor
    """[S, row] the slot pool (flat expert rows)."""
    host: torch.Tensor | None
    """[L*E, row] every expert, row l*E+e (pinned on CUDA: read zero-copy by the kernel); None: use ``host_row``."""
    host_row: HostRow
    table: torch.Tensor
    """[L, E] int32: slot of each expert, -1 when not resident."""
    cand: torch.Tensor
    """[3, C] int32: candidate slots for this step's read-through fills, in order, with the layer and expert of
    the key each holds (layer -1: a free slot; slot -1: padding)."""
    taken: torch.Tensor
    """[C + 1] bool: candidates claimed so far in the step (the last entry absorbs unclaimed writes)."""
    scratch: torch.Tensor
    """[C] int32 scratch of the fused route kernel."""
    served: torch.Tensor
    """[L, E] int8: 0 unused, 1 read from a slot, 2 read from host memory."""
    filled: torch.Tensor
    """[L, E] int32: the slot a missed expert was written into, -1 for none."""
    layout: ExpertLayout


@dataclass(frozen=True)
class Projections:
    """Where an experts module's weights sit in an expert row, and how its gating runs (from transformers)."""

    first: str
    """"gate_up_proj" (gated) or "up_proj"."""
    first_bias: str | None
    down_bias: str | None
    transposed: bool
    """Weights stored [D, N] (gpt-oss) instead of [N, D]."""

    @staticmethod
    def of(module: nn.Module, layout: ExpertLayout) -> Projections:
        names = {p.name for p in layout.params}
        first = "gate_up_proj" if getattr(module, "has_gate", True) and "gate_up_proj" in names else "up_proj"
        known = {first, "down_proj", f"{first}_bias", "down_proj_bias"}
        if not names <= known or {first, "down_proj"} - names:
            raise NotImplementedError(f"slot-table experts cannot run an experts module with {sorted(names)}")
        bias = f"{first}_bias" if f"{first}_bias" in names else None
        down_bias = "down_proj_bias" if "down_proj_bias" in names else None
        return Projections(first, bias, down_bias, bool(getattr(module, "is_transposed", False)))


def group_pairs(
    src: SlotTensors, layer: int, ids: torch.Tensor, live: torch.Tensor | None, fused: bool | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Group the layer's pairs by expert and claim candidate slots for its misses (``claims.route_layer``'s rule):
    on a GPU in one kernel with no host sync; elsewhere in NumPy on the host.

    Returns ((order [P], counts [E], starts [E]) int32, the layer's slot row [E], claims [E])."""
    if ids.is_cuda if fused is None else fused:  # on the device: one Triton launch (route_kernel.py)
        from moeflow.experts.route_kernel import route

        groups, claim = route(ids, live, src.table[layer], src.cand, src.taken, src.served, src.filled,
                              src.scratch, layer)  # fmt: skip
        return groups, src.table[layer], claim
    live_np = live.numpy() if live is not None else None
    order, counts, starts, claim = route_layer(ids.numpy(), live_np, src.table[layer].numpy(), src.cand.numpy(),
                                               src.taken.numpy(), src.served.numpy(), src.filled.numpy(), layer)  # fmt: skip
    groups = tuple(torch.from_numpy(a) for a in (order, counts, starts))
    return groups, src.table[layer], torch.from_numpy(claim)


def slot_experts_forward(
    module: nn.Module,
    src: SlotTensors,
    layer: int,
    hidden: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
    live: torch.Tensor | None,  # [T] bool: rows whose output counts (None: all)
    blocks: dict | None = None,
) -> torch.Tensor:  # [T, H]
    """The layer's experts output, combining each token's chosen experts as transformers does."""
    t, k = ids.shape
    hidden = hidden.contiguous()
    groups, slot, claim = group_pairs(src, layer, ids, live)
    proj = Projections.of(module, src.layout)
    if hidden.is_cuda and src.host is not None:
        down = _triton_layer(module, src, layer, proj, hidden, groups, slot, claim, k, blocks)
    else:
        down = _reference_layer(module, src, layer, proj, hidden, groups, slot, claim, k)
    if getattr(module, "has_post_expert_norm", False):
        down = module.post_expert_norm(down)
    if live is not None:
        weights = weights * live[:, None].to(weights.dtype)
    weighted = down * weights.reshape(-1, 1)  # [P, H]
    return weighted.view(t, k, -1).sum(dim=1).to(hidden.dtype)


def _gate(module: nn.Module, proj: Projections, x: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(x) if proj.first == "gate_up_proj" else module.act_fn(x)


def _param(src: SlotTensors, name: str | None) -> tuple[int, tuple[int, ...]]:
    p = next(p for p in src.layout.params if p.name == name)
    return p.offset, p.shape


def _triton_layer(module, src, layer, proj, hidden, groups, slot, claim, k, blocks) -> torch.Tensor:
    from moeflow.experts.slot_kernel import slot_linear

    num_experts, p = src.table.shape[1], hidden.shape[0] * k
    row0 = layer * num_experts
    outs = []
    x = hidden
    for name, bias, pair_rows in ((proj.first, proj.first_bias, False), ("down_proj", proj.down_bias, True)):
        off, shape = _param(src, name)
        n, d = (shape[1], shape[0]) if proj.transposed else shape
        strides = (1, n) if proj.transposed else (d, 1)
        b_off = _param(src, bias)[0] if bias else None
        y = (torch.empty if not pair_rows else torch.zeros)(p, n, dtype=hidden.dtype, device=hidden.device)
        slot_linear(x, y, groups, slot, claim, src.pool, src.host, row0, (off, *strides), b_off, k, pair_rows,
                    fill=True, blocks=blocks)  # fmt: skip
        outs.append(y)
        x = _gate(module, proj, y).contiguous() if not pair_rows else x
    return outs[1]


def _reference_layer(module, src, layer, proj, hidden, groups, slot, claim, k) -> torch.Tensor:
    """The same computation expert by expert in torch (host syncs: for CPUs and tests)."""
    order, counts, starts = (g.tolist() for g in groups)
    slots, claims = slot.tolist(), claim.tolist()
    down = torch.zeros(hidden.shape[0] * k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        row = src.pool[slots[e]] if slots[e] >= 0 else src.host_row(layer, e).to(hidden.device)
        if claims[e] >= 0:
            src.pool[claims[e]].copy_(row)
        w = {name: v[0] for name, v in src.layout.views(row[None]).items()}
        pairs = torch.tensor(order[starts[e] : starts[e] + cnt], device=hidden.device, dtype=torch.long)
        x = _linear(hidden[pairs // k], w[proj.first], w.get(proj.first_bias or ""), proj.transposed)
        x = _linear(_gate(module, proj, x), w["down_proj"], w.get(proj.down_bias or ""), proj.transposed)
        down[pairs] = x
    return down


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else x @ w.T
    return y + b if b is not None else y
