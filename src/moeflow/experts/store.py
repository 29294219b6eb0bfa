"""Expert tiers and the execution of plans: checkpoint (disk, mmap) -> host pool -> device slots.

The store owns the bytes: a host pool of ``host_capacity`` expert buffers (pinned when the device is a GPU; every
expert preloaded when all fit) kept by LRU (``experts.host_pool``), and ``num_slots`` device slots, one contiguous
row per expert so a transfer is one copy. It executes :class:`~moeflow.experts.cache.Load` lists from a policy:
demand loads block until their copy is done (on a high-priority stream); prefetch loads copy on a separate CUDA
stream, at once when the expert is in the host pool, else after a disk read on a background thread. One event per
slot lets compute wait only for the slots it uses, and one per slot use keeps a copy from overwriting a slot still
being read. Queued prefetches whose layer has passed are dropped (the policy frees their slots); a queued prefetch
that a layer needs is copied at once on the demand stream.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from moeflow.experts.accounting import StoreStats
from moeflow.experts.cache import Key, Load
from moeflow.experts.host_pool import HostPool
from moeflow.experts.quant_tiers import compute_views, low_copies
from moeflow.model.loader import LoadedModel


@dataclass
class _Queued:
    """A prefetch handed to the disk-reader thread and not yet known to be issued."""

    future: Future
    load: Load
    due: int
    """Layer position (step x layers + layer) that the copy is for; stale once the forward pass is past it."""


class ExpertStore:
    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int,
        host_capacity: int,
        progress: bool = True,
        share_host: ExpertStore | None = None,
        serves: list[Key] | None = None,
    ):
        """``serves``: the experts this store may be asked for (an expert-parallel rank's homed ones; default all),
        preloaded into the host pool when they all fit."""
        self.loaded = loaded
        self.device = loaded.device
        self.cuda = self.device.type == "cuda"
        self.codec, self.low_codec = (
            loaded.codecs.host,
            loaded.codecs.low,
        )  # quantised rows (None: full precision)
        numel, dtype = loaded.layout.numel, loaded.dtype
        if self.codec is not None:  # quantised rows: bytes, dequantised as they are computed with
            numel, dtype = self.codec.nbytes, torch.uint8
        self.slots = torch.empty(num_slots, numel, dtype=dtype, device=self.device)  # [S, P]
        self.views = (
            loaded.layout.views(self.slots) if self.codec is None else {}
        )  # name -> [S, *param shape]
        self.stats = StoreStats()
        if share_host is not None:  # a new slot pool over the same host tier (benchmarks sweep slot counts)
            pool = HostPool(loaded, share_host.host, share_host.host_row, self.stats, self.device)
        else:
            pool = HostPool.allocate(loaded, host_capacity, numel, dtype, self.stats, self.device)
        self.host_pool = pool
        self.host, self.host_row, self.host_capacity = pool.rows, pool.row_of, pool.capacity  # [H, P]
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeflow-disk")
        self._pending: dict[int, _Queued] = {}  # slot -> prefetch queued or in flight
        self.copy_stream = torch.cuda.Stream(self.device, priority=-1) if self.cuda else None
        self.prefetch_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: list[torch.cuda.Event | None] = [None] * num_slots
        self._released: list[torch.cuda.Event | None] = [None] * num_slots
        self._in_flight: set[int] = set()  # slots with a copy that may not have landed
        total = len(loaded.layers) * loaded.num_experts
        self.low = (
            share_host.low if share_host is not None else low_copies(loaded, total, self.cuda, progress)
        )
        """[L*E, row] every expert's low-precision copy (``--miss-dtype``), row l*E+e; None without one."""
        keys = serves
        if keys is None:
            keys = [(layer, e) for layer in range(len(loaded.layers)) for e in range(loaded.num_experts)]
        if share_host is None:
            pool.preload(keys, host_capacity, progress)
        self.copy_s = self._probe()
        """Measured seconds to copy one expert host -> device slot (sizes the policies' prefetch budgets)."""

    @property
    def num_slots(self) -> int:
        return self.slots.shape[0]

    def compute_views(
        self, slots: list[int], missed: dict[int, Key]
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Weights to compute ``slots`` with, and the index of each slot in them (``quant_tiers.compute_views``)."""
        return compute_views(self, slots, missed)

    # --------------------------------------------------------------------------------- device tier
    def _on(self, stream: torch.cuda.Stream | None) -> AbstractContextManager:
        """Make ``stream`` current (once for a batch of copies: entering a stream context is not free)."""
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def _copy_on(self, load: Load, stream: torch.cuda.Stream | None) -> None:
        with self._on(stream):
            self._copy(load, stream)

    def _copy(self, load: Load, stream: torch.cuda.Stream | None) -> None:
        """Copy ``load`` into its slot on ``stream``, which the caller has made current (see ``_on``)."""
        # The lock spans host lookup and copy issue: no other thread may recycle the host row in between.
        with self.host_pool.lock:
            if not self.host_capacity:  # a CPU without a host pool: read into the slot, no buffer between
                self.stats.bytes_from_disk += self.loaded.read_expert(*load.key, self.slots[load.slot])
                self.stats.bytes_to_device += self.loaded.expert_bytes
                return
            src = self.host_pool.get(load.key)
            if stream is None:
                self.slots[load.slot].copy_(src)
            else:
                for before in (self._released[load.slot], self._ready[load.slot]):
                    if (
                        before is not None
                    ):  # compute still reading the slot; an earlier copy into it (any stream)
                        stream.wait_event(before)
                self.slots[load.slot].copy_(src, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
                self._ready[load.slot] = ready
                self._in_flight.add(load.slot)
                self.host_pool.busy[self.host_row[load.key]] = ready  # the pinned row is read until `ready`
        self.stats.bytes_to_device += self.loaded.expert_bytes

    def load(self, loads: tuple[Load, ...] | list[Load]) -> None:
        """Demand loads: done (and waited for) before returning; time counted as stall."""
        if not loads:
            return
        t0 = time.perf_counter()
        with self._on(self.copy_stream):
            for load in loads:
                self._settle(load.slot)
                self._copy(load, self.copy_stream)
                self.stats.demand_loads += 1
        if self.cuda:
            for load in loads:
                self._ready[load.slot].synchronize()
        self.stats.stall_s += time.perf_counter() - t0

    def prefetch(self, loads: list[Load], step: int = 0, layer: int = -1) -> None:
        """Start prefetch loads issued at ``layer`` of forward ``step``, copies on the prefetch stream. Experts in
        the pinned host pool are copied at once; the others queue for the disk-reader thread (a load for a layer
        after ``layer`` is due in this step, else in the next; ``drop_stale`` drops it once that layer passed)."""
        num_layers = len(self.loaded.layers)
        if not loads:
            return
        with self._on(self.prefetch_stream):
            for load in sorted(loads, key=lambda ld: -ld.priority):
                self._settle(load.slot)
                self.stats.prefetch_loads += 1
                if self.cuda and load.key in self.host_row:  # in pinned RAM: copy now, no thread hop
                    self._copy(load, self.prefetch_stream)
                    continue
                target = load.key[0]
                due = step * num_layers + target + (0 if target > layer else num_layers)
                future = self._reader.submit(self._copy_on, load, self.prefetch_stream)
                self._pending[load.slot] = _Queued(future, load, due)

    def drop_stale(self, step: int, layer: int) -> list[Load]:
        """Drop queued prefetches the reader has not started whose layer is already past (``layer`` of ``step``
        is about to run); returns them so the policy can free their slots."""
        now = step * len(self.loaded.layers) + layer
        dropped = []
        for slot, queued in list(self._pending.items()):
            if queued.future.done():  # issued already: nothing left to wait for (a failed read raises here)
                del self._pending[slot]
                queued.future.result()
            elif queued.due < now and queued.future.cancel():
                del self._pending[slot]
                dropped.append(queued.load)
        self.stats.prefetch_dropped += len(dropped)
        return dropped

    def _settle(self, slot: int, promote: bool = False) -> None:
        """Resolve a prefetch queued for ``slot``: not started -> dropped (a new load takes the slot) or, with
        ``promote``, copied now on the demand stream (jumping the queue); started -> waited for until issued."""
        queued = self._pending.pop(slot, None)
        if queued is None:
            return
        if queued.future.cancel():
            if promote:
                self._copy_on(queued.load, self.copy_stream)
                self.stats.prefetch_promoted += 1
            else:
                self.stats.prefetch_dropped += 1
            return
        t0 = time.perf_counter()
        queued.future.result()
        self.stats.stall_s += time.perf_counter() - t0

    def ready(self, slots: list[int]) -> None:
        """Make the compute stream wait until ``slots`` hold their experts."""
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        for slot in slots:
            self._settle(slot, promote=True)
            ev = self._ready[slot]
            if ev is not None:
                compute.wait_event(ev)

    def release(self, slots: list[int]) -> None:
        """Compute reading ``slots`` has been issued: later copies into them wait for it."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._released[slot] = ev

    # ------------------------------------------------------------ static decode (see experts/slot_table.py)
    def host_row_of(self, key: Key) -> torch.Tensor:
        """The host-pool row holding ``key`` (read from disk when absent)."""
        return self.host_pool.get(key)

    def landed(self, slot: int) -> bool:
        """The last copy into ``slot`` (and what was queued after it on its stream) has finished."""
        ev = self._ready[slot]
        return ev is None or ev.query()

    def in_flight(self) -> set[int]:
        """Slots whose last copy has not landed yet (only the slots copied into since the last call are asked)."""
        self._in_flight = {slot for slot in self._in_flight if not self.landed(slot)}
        return set(self._in_flight)

    def wait_landed(self, slot: int) -> None:
        """Make the compute stream wait for the last copy into ``slot``."""
        ev = self._ready[slot]
        if ev is not None and not ev.query():
            torch.cuda.current_stream(self.device).wait_event(ev)

    def copy_published(self, loads: list[Load], table: torch.Tensor, keys: list[int]) -> None:
        """Copy prefetch ``loads`` on the copy stream, then set ``table[keys]`` to their slots on that stream (the
        experts become visible to the kernel only once their bytes have landed)."""
        slots = [load.slot for load in loads]
        self.stats.prefetch_loads += len(loads)
        if not self.cuda:
            for load in loads:
                self._copy(load, None)
            table[torch.tensor(keys)] = torch.tensor(slots, dtype=table.dtype)
            return
        with self._on(self.copy_stream):
            for load in loads:
                self._copy(load, self.copy_stream)
            index = torch.tensor(keys, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)
            value = torch.tensor(slots, dtype=table.dtype, pin_memory=True).to(self.device, non_blocking=True)
            table[index] = value
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        for slot in slots:
            self._ready[slot] = done
        self._in_flight.update(slots)

    def _probe(self, repeats: int = 3) -> float:
        """Seconds per expert copy host -> slot 0 (before any slot is in use)."""
        if self.num_slots == 0:
            return 0.0
        src = self.host[0] if self.host_capacity else torch.empty_like(self.slots[0])
        self.slots[0].copy_(src, non_blocking=self.cuda)  # warm-up
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            self.slots[0].copy_(src, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) / repeats

    def close(self) -> None:
        self._reader.shutdown(wait=True)
