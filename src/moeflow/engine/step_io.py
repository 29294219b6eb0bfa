"""What crosses between host and device around a static step (decode or slot-table prefill): the replayed routing
going up before it, and what it routed and served coming back after it, in one wait.
Legend: L MoE layers, T rows of the step, K top-k."""

from __future__ import annotations

import torch

from moeflow.experts.layer import Runtime, StaticBuffers
from moeflow.experts.plan import StepRouting
from moeflow.experts.slot_table import SlotTable


def upload_replay(
    rt: Runtime,
    bufs: StaticBuffers,
    rows: list[int],
    staging: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The step's replayed routing (``rt.ctx.replay_rows``, one trace row per real row) into ``bufs``' replay
    buffers at ``rows``; the other rows keep what they held (their outputs count for nothing). ``staging``: pinned
    host buffers of the same shape, reused step after step (the upload then does not block the host)."""
    assert rt.replay is not None and bufs.replay_ids is not None and bufs.replay_w is not None
    if staging is None:
        staging = (torch.zeros(bufs.replay_ids.shape, dtype=torch.long),
                   torch.zeros(bufs.replay_w.shape, dtype=torch.float32))  # fmt: skip
    elif bufs.replay_ids.is_cuda:
        torch.cuda.current_stream(bufs.replay_ids.device).synchronize()  # the last upload has been read
    ids, weights = staging
    experts, w = rt.replay.route_all(rt.ctx.replay_rows)  # [L, T_real, K] each
    ids.numpy()[:, rows], weights.numpy()[:, rows] = experts, w
    bufs.replay_ids.copy_(ids, non_blocking=True)
    bufs.replay_w.copy_(weights, non_blocking=True)


def read_back(
    rt: Runtime,
    table: SlotTable,
    bufs: StaticBuffers,
    live: list[int],
    route_host: torch.Tensor | None = None,
) -> StepRouting:
    """What the step through ``bufs`` routed and served for its ``live`` rows, read back in one wait
    (``route_host``: a pinned host copy of ``route_ids`` to reuse); the store's byte counters and the trace
    recorder are updated."""
    route = bufs.route_ids
    served, filled = table.copy_back()
    host = torch.empty_like(route, device="cpu") if route_host is None else route_host
    host.copy_(route, non_blocking=host.is_pinned())
    if route.is_cuda:
        torch.cuda.current_stream(route.device).synchronize()  # the one wait for all the step's results
    experts = host[:, live].numpy()  # [L, T, K] (fancy indexing copies)
    routing = StepRouting(experts, served.copy(), filled.copy())
    store = rt.store
    missed = int((served == 2).sum()) * store.loaded.expert_bytes
    store.stats.bytes_to_device += missed
    store.stats.bytes_zero_copy += missed
    rec = rt.recorder
    if rec is not None and bufs.route_w is not None:
        weights = bufs.route_w[:, live].cpu().numpy()
        for layer in range(experts.shape[0]):
            rec.record(layer, experts[layer], weights[layer])
    return routing
