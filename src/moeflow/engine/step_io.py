"""What crosses between host and device around a static step (decode or slot-table prefill): the replayed routing
going up before it, and what it routed and served coming back after it. The read-back has two halves: ``start``
queues the copies behind the step (into pinned host buffers, with an event), ``finish`` waits for that event only,
so the host can queue the next step in between (``engine/overlap.py``); ``read_back`` does both.
Legend: L MoE layers, T rows of the step, K top-k, B rows of a bucket."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeflow.experts.layer import Runtime, StaticBuffers
from moeflow.experts.plan import StepRouting
from moeflow.experts.slot_table import SlotTable


@dataclass
class HostCopies:
    """Host buffers one step's results are copied into (pinned on a GPU), reused step after step."""

    route: torch.Tensor  # [L, B, K] the routed experts
    served: torch.Tensor  # [L, E] int8: 0 unused, 1 hit, 2 miss
    filled: torch.Tensor  # [L, E] int32: the slot each miss was written into, -1 none
    tokens: torch.Tensor | None = None  # [B] the greedy tokens, when asked for
    event: torch.cuda.Event | None = None
    """Recorded behind the copies (a GPU only): ``finish`` waits for it, not for the whole stream."""

    @staticmethod
    def like(
        table: SlotTable, bufs: StaticBuffers, tokens: bool = False, pin: bool | None = None
    ) -> HostCopies:
        """Buffers for ``bufs``' results (``pin`` None: pinned when they are on a GPU)."""
        t, route = table.tensors, bufs.route_ids
        pin = route.is_cuda if pin is None else pin
        rows = route.shape[1]

        def host(x: torch.Tensor) -> torch.Tensor:
            return torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)

        tok = torch.empty(rows, dtype=torch.long, pin_memory=pin) if tokens else None
        return HostCopies(host(route), host(t.served), host(t.filled), tok)


def replay_staging(bufs: StaticBuffers, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Host buffers shaped like ``bufs``' replayed routing (ids, weights) to stage its uploads in."""
    assert bufs.replay_ids is not None and bufs.replay_w is not None
    return (torch.zeros(bufs.replay_ids.shape, dtype=torch.long, pin_memory=pin),
            torch.zeros(bufs.replay_w.shape, dtype=torch.float32, pin_memory=pin))  # fmt: skip


def upload_replay(
    rt: Runtime,
    bufs: StaticBuffers,
    rows: list[int],
    staging: tuple[torch.Tensor, torch.Tensor] | None = None,
    trace_rows: np.ndarray | None = None,
    waited: bool = False,
) -> None:
    """The step's replayed routing (``trace_rows``, default ``rt.ctx.replay_rows``: one trace row per real row) into
    ``bufs``' replay buffers at ``rows``; the other rows keep what they held (their outputs count for nothing).
    ``staging``: pinned host buffers of the same shape, reused step after step: the host first waits until their
    last upload was read (the whole stream), unless the caller has ``waited`` for it."""
    assert rt.replay is not None and bufs.replay_ids is not None and bufs.replay_w is not None
    if staging is None:
        staging = replay_staging(bufs, pin=False)
    elif bufs.replay_ids.is_cuda and not waited:
        torch.cuda.current_stream(bufs.replay_ids.device).synchronize()  # the last upload has been read
    ids, weights = staging
    experts, w = rt.replay.route_all(
        rt.ctx.replay_rows if trace_rows is None else trace_rows
    )  # [L, T_real, K]
    ids.numpy()[:, rows], weights.numpy()[:, rows] = experts, w
    bufs.replay_ids.copy_(ids, non_blocking=True)
    bufs.replay_w.copy_(weights, non_blocking=True)


def start_read_back(
    table: SlotTable, bufs: StaticBuffers, host: HostCopies, tokens: torch.Tensor | None = None
) -> None:
    """Queue the copies of what the step through ``bufs`` routed and served (and its greedy ``tokens`` [B]) into
    ``host``, behind the step."""
    pinned = host.route.is_pinned()
    table.copy_back((host.served, host.filled))
    host.route.copy_(bufs.route_ids, non_blocking=pinned)
    if tokens is not None:
        assert host.tokens is not None
        host.tokens.copy_(tokens, non_blocking=pinned)
    if bufs.route_ids.is_cuda:
        host.event = torch.cuda.Event()
        host.event.record()


def finish_read_back(rt: Runtime, bufs: StaticBuffers, host: HostCopies, live: list[int]) -> StepRouting:
    """Wait for ``host``'s copies and return what the step routed and served for its ``live`` rows; the store's
    byte counters and the trace recorder are updated."""
    if host.event is not None:
        host.event.synchronize()  # the one wait for all the step's results
    experts = host.route[:, live].numpy()  # [L, T, K] (fancy indexing copies)
    served, filled = host.served.numpy(), host.filled.numpy()
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


def read_back(
    rt: Runtime, table: SlotTable, bufs: StaticBuffers, live: list[int], host: HostCopies | None = None
) -> StepRouting:
    """What the step through ``bufs`` routed and served for its ``live`` rows, read back in one wait (``host``:
    buffers to reuse)."""
    host = HostCopies.like(table, bufs, pin=False) if host is None else host  # one-off: not worth pinning
    start_read_back(table, bufs, host)
    return finish_read_back(rt, bufs, host, live)
