"""The simulator's model of static decode, and of the engine's own batching.

``StaticSteps`` makes the calls the engine makes in a static decode step (``begin_step``, ``plan_boundary``,
the device's per-layer bookkeeping by ``claims.route_layer``, ``settle_step``, ``end_step``), with every prefetch
copy landed before the step reads the table (as on a CPU, where copies are synchronous). ``recorded_schedule``
replays a trace in the steps it was recorded in, so a trace the engine recorded is simulated batch for batch.
Legend: T tokens, L layers, K top-k, E experts, S slots.
"""

from __future__ import annotations

import numpy as np

from moeflow.experts.cache import CachePolicy, StepInfo, StepRouting
from moeflow.experts.claims import route_layer
from moeflow.experts.plan import Boundary
from moeflow.routing.trace import Trace


def recorded_schedule(trace: Trace) -> list:
    """The trace's own steps (its ``step`` field), sequences in recorded order: the engine's batching."""
    from moeflow.sim.simulator import SimStep

    last = {int(r): int(np.flatnonzero(trace.request == r).max()) for r in trace.requests()}
    steps = []
    for index, s in enumerate(np.unique(trace.step)):
        rows = np.flatnonzero(trace.step == s)
        rids = list(dict.fromkeys(int(r) for r in trace.request[rows]))
        parts = [rows[trace.request[rows] == r] for r in rids]
        info = StepInfo(index, tuple(rids), tuple(tuple(int(t) for t in trace.token[p]) for p in parts),
                        tuple(int(trace.position[p[0]]) for p in parts), not bool(trace.decode[rows[0]]))  # fmt: skip
        ended = tuple(r for r in rids if last[r] <= rows.max())
        steps.append(SimStep(info, rows, ended))
    return steps


class StaticSteps:
    """The static decode path's steps against one policy. ``lagged``: as the engine's offloaded overlap
    (``EngineConfig.overlap_offloaded``): where the next step is a decode step of the same requests, it is planned
    (``plan_in_flight``) after ``begin_step`` of this one and before this one is settled, and its table is that
    plan's with this step's fills folded in (``SlotTensors.begin_step``)."""

    def __init__(self, pol: CachePolicy, lagged: bool = False):
        self.pol, self.lagged = pol, lagged
        self._next: tuple[np.ndarray, np.ndarray] | None = None
        """The (table, candidates) of a step planned in flight (its ``begin_step`` made)."""

    def run(self, info: StepInfo, experts: np.ndarray, next_info: StepInfo | None = None) -> None:
        """One static decode step of ``experts`` [T, L, K] (the step's live tokens); ``next_info``: the step after
        it, if any."""
        pol = self.pol
        if self._next is None:
            pol.begin_step(info)
            table, cand = self._device(pol.plan_boundary(len(info.request_ids)))
        else:
            table, cand = self._next
        num_layers, num_experts = pol.num_layers, pol.num_experts
        taken = np.zeros(cand.shape[1] + 1, bool)
        served = np.zeros((num_layers, num_experts), np.int8)
        filled = np.full((num_layers, num_experts), -1, np.int32)
        for layer in range(num_layers):
            route_layer(experts[:, layer], None, table[layer], cand, taken, served, filled, layer)
        ahead = (
            self.lagged
            and next_info is not None
            and not next_info.prefill
            and next_info.request_ids == info.request_ids
        )
        plan = pol.plan_in_flight(len(info.request_ids)) if ahead else None
        pol.settle_step(StepRouting(experts.transpose(1, 0, 2), served, filled))
        pol.end_step()
        self._next = None
        if plan is not None:
            assert next_info is not None
            pol.begin_step(next_info)
            table, next_cand = self._device(plan)
            flat = table.reshape(-1)
            claimed = taken[: cand.shape[1]] & (cand[0] >= 0) & (cand[1] >= 0)
            flat[cand[1][claimed] * num_experts + cand[2][claimed]] = -1
            fills = filled.reshape(-1)
            flat[fills >= 0] = fills[fills >= 0]
            self._next = (table, next_cand)

    def _device(self, boundary: Boundary) -> tuple[np.ndarray, np.ndarray]:
        """The table [L, E] and candidates [3, C] the device holds for a step planned by ``boundary``."""
        pol = self.pol
        num_layers, num_experts = pol.num_layers, pol.num_experts
        table = np.full(num_layers * num_experts, -1, np.int32)
        held = boundary.resident >= 0
        table[boundary.resident[held]] = np.flatnonzero(held)
        cand_slots = np.asarray(boundary.candidates[: pol.num_slots // 2 + 1], np.int64)
        keys = boundary.resident[cand_slots] if len(cand_slots) else np.zeros(0, np.int64)
        cand = np.stack(
            [
                cand_slots,
                np.where(keys >= 0, keys // num_experts, -1),
                np.where(keys >= 0, keys % num_experts, -1),
            ]
        )
        return table.reshape(num_layers, num_experts), cand
