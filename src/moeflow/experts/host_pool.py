"""The host tier of an expert store: a pool of expert rows in host RAM (pinned when the device is a GPU), kept by
LRU and read from the checkpoint on a miss, with the event per row after which no copy reads it any more (a row
is recycled only once its copy is done). Every expert is preloaded when they all fit (quantised at once when the
model quantises as it reads, ``quant_tiers.preload_quantised``). Without rows (a CPU without a host budget) a miss
reads into a new buffer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from moeflow.experts.accounting import StoreStats
from moeflow.experts.plan import Key
from moeflow.experts.quant_tiers import preload_quantised
from moeflow.model.loader import LoadedModel


class HostPool:
    """Host rows ``rows`` [H, P] and the key each holds (``row_of``, LRU order, oldest first); the disk reads are
    counted in ``stats``. Two pools may share ``rows`` and ``row_of`` (each with its own lock and events)."""

    def __init__(
        self,
        loaded: LoadedModel,
        rows: torch.Tensor,
        row_of: OrderedDict[Key, int],
        stats: StoreStats,
        device: torch.device,
    ):
        self.loaded, self.rows, self.row_of, self.stats, self.device = loaded, rows, row_of, stats, device
        self.capacity = rows.shape[0]
        self.lock = threading.RLock()
        """Held from a row's lookup until its copy is issued: no other thread may recycle the row in between."""
        self.busy: dict[int, torch.cuda.Event] = {}
        """Row -> the event recorded after the last copy that reads it."""

    @classmethod
    def allocate(
        cls,
        loaded: LoadedModel,
        capacity: int,
        numel: int,
        dtype: torch.dtype,
        stats: StoreStats,
        device: torch.device,
    ) -> HostPool:
        """A new pool of ``capacity`` rows of ``numel`` ``dtype`` elements for a store computing on ``device``."""
        cuda = device.type == "cuda"
        # a GPU copies through at least one pinned row; on a CPU without a host budget the slots are the only
        # copy (a miss reads straight into its slot: a row here would be RAM beyond both budgets)
        rows = max(capacity, 1) if cuda else capacity
        return cls(
            loaded, torch.empty(rows, numel, dtype=dtype, pin_memory=cuda), OrderedDict(), stats, device
        )

    def preload(self, keys: list[Key], budget: int, progress: bool) -> None:
        """Fill the pool when a ``budget`` of rows holds every expert (quantised at once when the model quantises
        as it reads) or else all of ``keys``."""
        loaded = self.loaded
        if budget >= len(loaded.layers) * loaded.num_experts and loaded.quantises_on_read:
            self.stats.bytes_from_disk += preload_quantised(loaded, self.rows, self.row_of, progress)
        elif budget >= len(keys):
            for key in tqdm(
                keys, desc="experts -> host RAM", unit="expert", disable=not progress, leave=False
            ):
                self.get(key)

    def get(self, key: Key) -> torch.Tensor:
        """The row holding ``key``, read from disk (evicting the LRU row) when absent; without rows, a new buffer
        read from disk."""
        if not self.capacity:
            out = torch.empty(self.rows.shape[1], dtype=self.rows.dtype, device=self.device)
            self.stats.bytes_from_disk += self.loaded.read_expert(key[0], key[1], out)
            return out
        with self.lock:
            row = self.row_of.get(key)
            if row is not None:
                self.row_of.move_to_end(key)
                return self.rows[row]
            if len(self.row_of) < self.capacity:
                row = len(self.row_of)
            else:
                _, row = self.row_of.popitem(last=False)
                busy = self.busy.pop(row, None)
                if busy is not None:
                    busy.synchronize()  # a copy may still read this pinned row
            self.stats.bytes_from_disk += self.loaded.read_expert(key[0], key[1], self.rows[row])
            self.row_of[key] = row
            return self.rows[row]
