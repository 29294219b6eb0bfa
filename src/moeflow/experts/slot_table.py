"""The device-side residency table of the static decode path, and the execution of a step boundary.

``table[l, e]`` is the slot holding expert ``e`` of layer ``l`` (-1: read it from host memory). It is a function of
the policy's residency (``Boundary.resident``) minus the slots whose copies have not landed: between steps the whole
table is uploaded on the compute stream (one small copy, before the next step), so an eviction takes effect at a
step boundary and no kernel reads a slot that is being overwritten. Prefetch copies then run on the store's copy
stream, each group followed by a device write of its table entries, so an expert becomes visible once its bytes
have landed, possibly in the middle of the next step. A second buffer holds the fill candidates (their slots, and
the layer and expert each holds) and the fold flag (``SlotTensors.fold``), uploaded with the table.
"""

from __future__ import annotations

import numpy as np
import torch

from moeflow.experts.plan import Boundary, Load
from moeflow.experts.slot_experts import SlotTensors
from moeflow.experts.store import ExpertStore

COPY_GROUP = 8
"""Prefetch copies per table write (a write is a small launch; a group becomes visible together)."""


class SlotTable:
    """The slot table of one store, with the small device buffers the static step reads and writes."""

    def __init__(self, store: ExpertStore, fill_cap: int):
        lm = store.loaded
        self.store, self.num_layers, self.num_experts = store, len(lm.layers), lm.num_experts
        n = self.num_layers * self.num_experts
        dev = store.device
        self.zero_copy = _host_is_ordered(store, self.num_layers, self.num_experts)
        """The kernel reads misses from the host pool by address (pinned, zero-copy, on a GPU)."""
        # the table, and apart from it (the step writes the table: no other input of the step may share its storage)
        # the candidates and the fold flag
        self._table = torch.full((n + 1,), -1, dtype=torch.int32, device=dev)  # and a spare entry (``flat``)
        self._buf = torch.full((3 * fill_cap + 1,), -1, dtype=torch.int32, device=dev)
        self._staging = (
            [torch.full((n + self._buf.shape[0],), -1, dtype=torch.int32).pin_memory() for _ in range(2)]
            if store.cuda
            else None
        )
        self._read: list[torch.cuda.Event | None] = [None, None]
        """Recorded behind the last upload from each staging buffer (it may be rewritten once that has run)."""
        self._uploads = 0
        self._uploaded: np.ndarray | None = None
        """The residency last uploaded with no copies in flight and no candidates (None: anything else)."""
        self._held: np.ndarray | None = None
        """The residency of the table on the device when it was uploaded with no copies queued (None: copies)."""
        cap = fill_cap
        self.tensors = SlotTensors(
            pool=store.slots,
            host=store.host if self.zero_copy else None,
            host_row=lambda layer, e: store.host_row_of((layer, e)),
            table=self._table[:n].view(self.num_layers, self.num_experts),
            flat=self._table,
            cand=self._buf[: 3 * cap].view(3, cap),
            taken=torch.zeros(fill_cap + 1, dtype=torch.bool, device=dev),
            last=torch.full((3, cap), -1, dtype=torch.int32, device=dev),
            fold=self._buf[3 * cap :],
            scratch=torch.zeros(fill_cap, dtype=torch.int32, device=dev),
            served=torch.zeros(self.num_layers, self.num_experts, dtype=torch.int8, device=dev),
            filled=torch.full((self.num_layers, self.num_experts), -1, dtype=torch.int32, device=dev),
            layout=lm.layout,
        )

    def apply(self, boundary: Boundary, fold: bool = False) -> None:
        """Between steps: upload the table (evictions take effect) and the fill candidates, start the copies.
        ``fold``: the boundary was planned before the step now running was settled (``CachePolicy.plan_in_flight``):
        the coming step folds that step's fills into the table first (``SlotTensors.begin_step``)."""
        store, num_experts = self.store, self.num_experts
        settled = not boundary.loads and not boundary.candidates and not store.in_flight() and not fold
        if settled and self._uploaded is not None and np.array_equal(self._uploaded, boundary.resident):
            return  # the device holds this table already, and no candidates: nothing to upload or copy
        held = not boundary.loads and not store.in_flight() and not fold
        self._held = boundary.resident.copy() if held else None  # a fold changes the table on the device
        self._uploaded = self._held if settled else None  # settled: no loads, none in flight, no candidates
        loading = np.zeros(store.num_slots, bool)
        loading[[load.slot for load in boundary.loads]] = True
        landed = ~loading
        landed[list(store.in_flight())] = False
        ok = (boundary.resident >= 0) & ~loading & landed  # a copy in flight publishes its own entry
        n = self.num_layers * num_experts
        host = np.full(n + self._buf.shape[0], -1, np.int32)
        host[boundary.resident[ok]] = np.flatnonzero(ok)
        cand = np.asarray(boundary.candidates, np.int64)
        cand = cand[landed[cand] & ~loading[cand]]
        cap = (self._buf.shape[0] - 1) // 3
        cand = cand[:cap]
        keys = boundary.resident[cand]
        c = host[n : n + 3 * cap].reshape(3, cap)
        c[0, : len(cand)] = cand
        c[1, : len(cand)] = np.where(keys >= 0, keys // num_experts, -1)
        c[2, : len(cand)] = np.where(keys >= 0, keys % num_experts, -1)
        host[-1] = int(fold)
        if self._staging is None:
            self._table[:n].copy_(torch.from_numpy(host[:n]))
            self._buf.copy_(torch.from_numpy(host[n:]))
        else:
            # every candidate's last copy, and the table write queued after it, has landed (``landed`` above): no
            # pending write for a slot's old key can land after this upload. Two staging buffers, each rewritten
            # only once its last upload has run (a step may still be queued before this one).
            i = self._uploads % 2
            self._uploads += 1
            if self._read[i] is not None:
                self._read[i].synchronize()
            self._staging[i].copy_(torch.from_numpy(host))
            self._table[:n].copy_(self._staging[i][:n], non_blocking=True)
            self._buf.copy_(self._staging[i][n:], non_blocking=True)
            self._read[i] = torch.cuda.Event()
            self._read[i].record()
        self._copy(boundary.loads)

    def holds_every_expert(self) -> bool:
        """Every expert of every layer is in a slot the device's table points to, with no copy in flight: no step
        can miss, so none claims a slot or changes the table."""
        held = self._held
        n = self.num_layers * self.num_experts
        return held is not None and not self.store.in_flight() and int((held >= 0).sum()) == n

    def unchanged_by(self, boundary: Boundary) -> bool:
        """Applying ``boundary`` would change nothing a step does: the table holds every expert and the boundary
        keeps it (no copies; its candidates cannot be claimed, since no step misses)."""
        return (
            not boundary.loads and self.holds_every_expert() and np.array_equal(self._held, boundary.resident)
        )

    def _copy(self, loads: tuple[Load, ...]) -> None:
        """Start the prefetch copies, after every step queued so far (one may still read a victim's slot)."""
        if loads and self.store.cuda:
            queued = torch.cuda.Event()
            queued.record()
            self.store.copy_stream.wait_event(queued)
        ordered = sorted(loads, key=lambda ld: -ld.priority)
        for start in range(0, len(ordered), COPY_GROUP):
            group = ordered[start : start + COPY_GROUP]
            keys = [ld.key[0] * self.num_experts + ld.key[1] for ld in group]
            self.store.copy_published(group, self._table[: self.num_layers * self.num_experts], keys)

    def copy_back(self, into: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Queue copies of the last step's (served [L, E], filled [L, E]) into the host tensors ``into`` (pinned on a
        GPU: without waiting; valid once the caller has waited for the step)."""
        t = self.tensors
        pinned = into[0].is_pinned()
        into[0].copy_(t.served, non_blocking=pinned)
        into[1].copy_(t.filled, non_blocking=pinned)


def _host_is_ordered(store: ExpertStore, num_layers: int, num_experts: int) -> bool:
    """Every expert sits in the host pool at row l*E+e (the preload order), so the kernel can address it."""
    if store.host_capacity < num_layers * num_experts:
        return False
    return all(store.host_row.get((layer, e)) == layer * num_experts + e
               for layer in range(num_layers) for e in range(num_experts))  # fmt: skip
