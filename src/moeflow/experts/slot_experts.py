"""Experts found through a device-side slot table: the static decode step's MoE layer, with no host round trip.

For each layer: the routed (token, expert) pairs are grouped by expert with device ops (nothing waits for the
host, so the step can be captured in a CUDA graph); each used expert is read from its slot when ``table[l, e] >= 0``
and from the host pool otherwise; a missed expert claims one of the candidate slots the policy offered for the step
(see ``claims.py``) and is written into it as it is read (read-through fill). What happened is left on the device for
the host to read after the step: ``served[l, e]`` (1 hit, 2 miss) and ``filled[l, e]`` (the slot filled, or -1).

On CUDA the projections run in the Triton kernel of :mod:`moeflow.experts.slot_kernel` (of
:mod:`moeflow.experts.slot_kernel_quant` for quantised rows, which a fill copies as they are); elsewhere a torch
reference with the same semantics (and the same fills) runs expert by expert, reading misses from the store's
host tier (which may read the checkpoint). Legend: T tokens, K top-k, E experts, H hidden, I intermediate, P = T*K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeflow.experts import ops  # noqa: F401  (registers the moeflow:: ops)
from moeflow.experts.claims import route_layer
from moeflow.experts.ops import BLOCK_KEYS, project
from moeflow.experts.quant_proj import precopy_default, project_quant, quant_proj, raw_offset
from moeflow.model.layout import ExpertLayout
from moeflow.quant.row import RowCodec

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
    last: torch.Tensor
    """[3, C] int32: ``cand`` of the step run last (what its ``taken`` and ``filled`` refer to)."""
    fold: torch.Tensor
    """[1] int32, uploaded with the candidates: 1 when the host planned this step before the last one was settled,
    so the table it uploaded lacks that step's fills (``begin_step`` folds them in)."""
    flat: torch.Tensor
    """[L*E + 1] int32: ``table``'s storage, then one entry that takes a fold's writes of nothing (so a fold writes
    only the entries it changes, never one a prefetch's table write on the copy stream may be setting)."""
    scratch: torch.Tensor
    """[C] int32 scratch of the fused route kernel."""
    served: torch.Tensor
    """[L, E] int8: 0 unused, 1 read from a slot, 2 read from host memory."""
    filled: torch.Tensor
    """[L, E] int32: the slot a missed expert was written into, -1 for none."""
    layout: ExpertLayout

    def begin_step(self) -> None:
        """Device ops at the start of a step (captured with it): the last step's fills folded into the table where
        the host planned without them (``fold``); then no candidate claimed, nothing served or filled.

        The fold is what the host's ``boundary.settle`` would do to the table: a claimed candidate's old key is
        dropped and each filled expert points to its slot. The host's plan left the last step's candidates alone
        (``CachePolicy.plan_in_flight``), so no entry of the uploaded table can contradict it."""
        flat, last, c = self.flat, self.last, self.cand.shape[1]
        n = flat.shape[0] - 1
        on = self.fold[0] != 0
        claimed = self.taken[:c] & (last[0] >= 0) & (last[1] >= 0) & on
        old = torch.where(claimed, last[1] * self.table.shape[1] + last[2], n)  # n: the spare entry
        flat.scatter_(0, old.long(), -1)
        filled = self.filled.view(-1)
        keys = torch.arange(n, device=flat.device)
        flat.scatter_(0, torch.where(on & (filled >= 0), keys, n), filled)
        last.copy_(self.cand)
        self.taken.zero_()
        self.served.zero_()
        self.filled.fill_(-1)


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
    the ``moeflow::route`` op (one Triton launch on a GPU, NumPy on the host); ``fused`` forces the kernel (True)
    or NumPy (False) for tests.

    Returns ((order [P], counts [E], starts [E]) int32, the layer's slot row [E], claims [E])."""
    args = (ids, live, src.table[layer], src.cand, src.taken, src.served, src.filled, src.scratch, layer)
    if fused:  # the kernel itself (Triton's interpreter runs it on a CPU)
        from moeflow.experts.route_kernel import route

        groups, claim = route(*args)
        return groups, src.table[layer], claim
    if fused is False:
        out = route_layer(
            *(a.numpy() if isinstance(a, torch.Tensor) else a for a in args if a is not src.scratch)
        )
        order, counts, starts, claim = (torch.from_numpy(a) for a in out)
    else:
        order, counts, starts, claim = torch.ops.moeflow.route(*args)
    return (order, counts, starts), src.table[layer], claim


def slot_experts_forward(
    module: nn.Module,
    src: SlotTensors,
    layer: int,
    hidden: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
    live: torch.Tensor | None,  # [T] bool: rows whose output counts (None: all)
    blocks: dict | None = None,
    codec: RowCodec | None = None,
) -> torch.Tensor:  # [T, H]
    """The layer's experts output, combining each token's chosen experts as transformers does; ``codec``: the
    rows of the pools are quantised (uint8, ``quant_proj.SLOT_FORMATS``), None: flat compute-dtype rows."""
    t, k = ids.shape
    hidden = hidden.contiguous()
    groups, slot, claim = group_pairs(src, layer, ids, live)
    proj = Projections.of(module, src.layout)
    if src.host is not None:
        down = _op_layer(module, src, layer, proj, hidden, groups, slot, claim, k, blocks, codec)
    else:
        down = _host_row_layer(module, src, layer, proj, hidden, groups, slot, claim, k, codec)
    if getattr(module, "has_post_expert_norm", False):
        down = module.post_expert_norm(down)
    if live is not None:
        weights = weights * live[:, None].to(weights.dtype)
    weighted = down * weights.reshape(-1, 1)  # [P, H]
    return weighted.view(t, k, -1).sum(dim=1).to(hidden.dtype)


def _gate(module: nn.Module, proj: Projections, x: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(x) if proj.first == "gate_up_proj" else module.act_fn(x)


def _weight(src: SlotTensors, proj: Projections, name: str) -> tuple[list[int], int, int]:
    """([offset, stride along N, stride along D], N, D) of a weight inside an expert row."""
    p = next(p for p in src.layout.params if p.name == name)
    n, d = (p.shape[1], p.shape[0]) if proj.transposed else p.shape
    return [p.offset, *((1, n) if proj.transposed else (d, 1))], n, d


def _bias(src: SlotTensors, name: str | None) -> int | None:
    return next(p.offset for p in src.layout.params if p.name == name) if name else None


def _op_layer(module, src, layer, proj, hidden, groups, slot, claim, k, blocks, codec) -> torch.Tensor:
    """Both projections through the ``moeflow::slot_linear`` op, or ``moeflow::slot_linear_quant`` for quantised
    rows (Triton on a GPU, torch on the host)."""
    opts = [blocks.get(key, -1) for key in BLOCK_KEYS] if blocks else []
    row0, x = layer * src.table.shape[1], hidden
    fill = not (blocks or {}).get("PRECOPY", precopy_default(codec))
    if not fill:  # claimed misses copied whole into their slots first, then read there (``precopy.py``)
        slot = torch.ops.moeflow.fill_claimed(groups[1], slot, claim, src.pool, src.host, row0)
    for name, bias, pair_rows in ((proj.first, proj.first_bias, False), ("down_proj", proj.down_bias, True)):
        if codec is not None:
            b_off = raw_offset(codec, bias)
            y = torch.ops.moeflow.slot_linear_quant(x, *groups, slot, claim, src.pool, src.host, row0,
                                                    quant_proj(codec, name).as_list(),
                                                    -1 if b_off is None else b_off, k, pair_rows, fill, opts)  # fmt: skip
        else:
            weight, n, _ = _weight(src, proj, name)
            b_off = _bias(src, bias)
            y = torch.ops.moeflow.slot_linear(x, *groups, slot, claim, src.pool, src.host, row0, weight,
                                              -1 if b_off is None else b_off, n, k, pair_rows, fill, opts)  # fmt: skip
        x = _gate(module, proj, y).contiguous() if not pair_rows else y
    return x


def _host_row_layer(module, src, layer, proj, hidden, groups, slot, claim, k, codec) -> torch.Tensor:
    """The same computation expert by expert, reading misses through ``host_row`` (a host tier that may read the
    checkpoint: host syncs, for CPUs and tests)."""
    order, counts, starts = (g.tolist() for g in groups)
    slots, claims = slot.tolist(), claim.tolist()
    if codec is not None:
        q1, q2 = quant_proj(codec, proj.first), quant_proj(codec, "down_proj")
        b1, b2 = raw_offset(codec, proj.first_bias), raw_offset(codec, proj.down_bias)
    else:
        (first, n1, _), (down_w, n2, _) = _weight(src, proj, proj.first), _weight(src, proj, "down_proj")
        b1, b2 = _bias(src, proj.first_bias), _bias(src, proj.down_bias)
    down = torch.zeros(hidden.shape[0] * k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        row = src.pool[slots[e]] if slots[e] >= 0 else src.host_row(layer, e).to(hidden.device)
        if claims[e] >= 0:
            src.pool[claims[e]].copy_(row)
        pairs = torch.tensor(order[starts[e] : starts[e] + cnt], device=hidden.device, dtype=torch.long)
        if codec is not None:
            x = project_quant(row, hidden, pairs, q1, b1, k, pair_rows=False)
            x = project_quant(row, _gate(module, proj, x), torch.arange(cnt), q2, b2, k, pair_rows=True)
        else:
            x = project(row, hidden, pairs, first, b1, n1, k, pair_rows=False)
            x = project(row, _gate(module, proj, x), torch.arange(cnt), down_w, b2, n2, k, pair_rows=True)
        down[pairs] = x
    return down
