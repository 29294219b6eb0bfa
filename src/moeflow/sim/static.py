"""The simulator's model of static decode, and of the engine's own batching.

``run_static_step`` makes the calls the engine makes in a static decode step (``begin_step``, ``plan_boundary``,
the device's per-layer bookkeeping by ``claims.route_layer``, ``settle_step``, ``end_step``), with every prefetch
copy landed before the step reads the table (as on a CPU, where copies are synchronous). ``recorded_schedule``
replays a trace in the steps it was recorded in, so a trace the engine recorded is simulated batch for batch.
Legend: T tokens, L layers, K top-k, E experts, S slots.
"""

from __future__ import annotations

import numpy as np

from moeflow.experts.cache import CachePolicy, StepInfo, StepRouting
from moeflow.experts.claims import route_layer
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


def run_static_step(pol: CachePolicy, info: StepInfo, experts: np.ndarray) -> None:
    """One static decode step of ``experts`` [T, L, K] (the step's live tokens)."""
    pol.begin_step(info)
    boundary = pol.plan_boundary(len(info.request_ids))
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
    taken = np.zeros(len(cand_slots) + 1, bool)
    served = np.zeros((num_layers, num_experts), np.int8)
    filled = np.full((num_layers, num_experts), -1, np.int32)
    table = table.reshape(num_layers, num_experts)
    for layer in range(num_layers):
        route_layer(experts[:, layer], None, table[layer], cand, taken, served, filled, layer)
    pol.settle_step(StepRouting(experts.transpose(1, 0, 2), served, filled))
    pol.end_step()
