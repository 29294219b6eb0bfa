"""moeflow's experts function, registered in transformers' ExpertsInterface as "moeflow".

Each MoE layer's experts module gets an :class:`OffloadedExperts` (attribute ``moeflow``) holding its layer index and
the engine's :class:`Runtime` (store, policy, recorder, replay): injected per model, no globals. One call:
router output -> (replay) -> drop stale prefetches -> observe/record -> policy plan -> store loads -> grouped
compute over slots -> prefetch (the eager step); or, in a static decode step (``StepContext.static``), the
slot-table experts with no host work at all.
Legend: T tokens, K top-k, E experts, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moeflow.experts.cache import CachePolicy
from moeflow.experts.compute import run_experts
from moeflow.experts.slot_experts import SlotTensors, slot_experts_forward
from moeflow.experts.store import ExpertStore
from moeflow.routing.trace import TraceRecorder, TraceReplay


@dataclass(frozen=True)
class StaticBuffers:
    """Device buffers of a static decode step (addresses fixed, so a captured graph can replay them)."""

    tensors: SlotTensors
    live: torch.Tensor
    """[B] bool: rows whose sequence is still running."""
    route_ids: torch.Tensor
    """[L, B, K] the routers' choices, written by each MoE layer (read back after the step)."""
    route_w: torch.Tensor | None = None
    """[L, B, K] float32 gate weights, written when recording a trace."""
    replay_ids: torch.Tensor | None = None
    """[L, B, K] replayed routing (uploaded before each step) used instead of the routers'."""
    replay_w: torch.Tensor | None = None
    blocks: dict | None = None
    """Kernel tile options (benchmarks)."""


@dataclass(frozen=True)
class StepContext:
    """What the MoE layers need to know about the current forward step; set once per step by the engine."""

    step: int = 0
    """Index of the forward step (dates prefetches, so the store can drop stale ones)."""
    prefill: bool = False
    keep: torch.Tensor | None = None
    """[T] bool: real (unpadded, unfinished) tokens; None = all (decided on the host: no device sync)."""
    replay_rows: np.ndarray | None = None
    """Trace rows of the step's real tokens (replay only)."""
    static: StaticBuffers | None = None
    """Set for a static decode step: experts through the slot table, no host work inside the step."""
    on_layer: Callable[[int], None] | None = None
    """Called after each eager MoE layer with its index (a long prefill's progress bar)."""


@dataclass
class Runtime:
    """Per-engine state shared by the MoE layers of one model."""

    store: ExpertStore
    policy: CachePolicy
    backend: str
    recorder: TraceRecorder | None = None
    replay: TraceReplay | None = None
    ctx: StepContext = field(default_factory=StepContext)

    def prefetch_after(self, layer: int) -> None:
        """Start the policy's prefetches once ``layer`` is routed (-1: before the step's first layer)."""
        self.store.prefetch(self.policy.prefetch(layer), self.ctx.step, layer)

    def report_timing(self, wall_s: float, stall_before: float) -> None:
        """A decode step took ``wall_s`` (the store's stall counter read ``stall_before`` at its start): the policy
        learns the compute time per layer and the time of one expert copy."""
        compute = max(wall_s - (self.store.stats.stall_s - stall_before), 0.0)
        self.policy.on_timing(compute / max(len(self.store.loaded.layers), 1), self.store.copy_s)

    def drop_stale(self, layer: int) -> None:
        """``layer`` is about to run: queued prefetches for layers already passed are dropped, slots freed."""
        for load in self.store.drop_stale(self.ctx.step, layer):
            self.policy.cancel(load)


class OffloadedExperts:
    def __init__(self, layer: int, module: nn.Module, runtime: Runtime):
        self.layer, self.module, self.rt = layer, module, runtime

    def __call__(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        ctx = self.rt.ctx
        if ctx.static is not None:
            return self._static(ctx.static, hidden, top_k_index, top_k_weights)
        rt, full = self.rt, hidden
        if ctx.keep is not None:
            hidden, top_k_index, top_k_weights = (
                hidden[ctx.keep],
                top_k_index[ctx.keep],
                top_k_weights[ctx.keep],
            )
        if rt.replay is not None and ctx.replay_rows is not None:
            top_k_index, top_k_weights = self._replayed(hidden.device, top_k_weights.dtype)
        if hidden.shape[0] == 0:
            return torch.zeros_like(full)
        experts = top_k_index.cpu().numpy()  # [T, K]: the one host sync per layer
        rt.drop_stale(self.layer)
        rt.policy.observe(self.layer, experts, None)
        if rt.recorder is not None:
            rt.recorder.record(self.layer, experts, top_k_weights.float().cpu().numpy())
        needed = np.unique(experts).tolist()
        result = self._compute(hidden, top_k_index, top_k_weights, needed)
        rt.prefetch_after(self.layer)
        if ctx.on_layer is not None:
            ctx.on_layer(self.layer)
        if ctx.keep is not None:  # padded / finished rows contribute nothing
            out = torch.zeros_like(full)  # [T, H]
            out[ctx.keep] = result
            return out
        return result

    def _static(
        self, buf: StaticBuffers, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Slot-table experts: device ops only (replayable in a graph); routing left in ``buf`` for the host."""
        if buf.replay_ids is not None and buf.replay_w is not None:
            index, weights = buf.replay_ids[self.layer], buf.replay_w[self.layer].to(weights.dtype)
        buf.route_ids[self.layer].copy_(index)
        if buf.route_w is not None:
            buf.route_w[self.layer].copy_(weights)
        return slot_experts_forward(self.module, buf.tensors, self.layer, hidden, index, weights, buf.live,
                                    buf.blocks, self.rt.store.codec)  # fmt: skip

    def _replayed(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        experts, weights = self.rt.replay.route(self.rt.ctx.replay_rows, self.layer)  # [T, K] each
        return torch.as_tensor(experts, device=device), torch.as_tensor(weights, device=device, dtype=dtype)

    def _compute(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, needed: list[int]
    ) -> torch.Tensor:
        """Run the layer in chunks of at most ``num_slots`` distinct experts (one chunk unless the batch needs more)."""
        rt, num_slots = self.rt, self.rt.store.num_slots
        total: torch.Tensor | None = None
        for start in range(0, len(needed), num_slots):
            chunk = needed[start : start + num_slots]
            plan = rt.policy.request(self.layer, chunk)
            rt.store.load(plan.loads)
            rt.store.ready(list(plan.slots))
            views, rows = rt.store.compute_views(list(plan.slots), {ld.slot: ld.key for ld in plan.loads})
            lut = torch.full((self.module.num_experts,), -1, dtype=torch.long)
            lut[chunk] = torch.tensor(rows)
            slot_index = lut.to(index.device)[index]  # [T, K]
            chunk_weights = weights
            if len(chunk) < len(needed):  # pairs outside this chunk: any slot, zero weight
                outside = slot_index < 0
                slot_index = slot_index.masked_fill(outside, rows[0])
                chunk_weights = weights.masked_fill(outside, 0)
            part = run_experts(rt.backend, self.module, views, hidden, slot_index, chunk_weights, list(rows))
            rt.store.release(list(plan.slots))
            total = part if total is None else total + part
        assert total is not None
        return total


def attach(layers: list, runtime: Runtime) -> None:
    """Give each MoE layer's experts module its handler."""
    for spec in layers:
        spec.module.moeflow = OffloadedExperts(spec.index, spec.module, runtime)
