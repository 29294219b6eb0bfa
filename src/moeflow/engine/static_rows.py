"""Continuous batching on the static decode path: a static bucket whose KV rows are assigned to sequences.

The bucket's cache (``StaticRowKV``) is the row pool of ``rows.py`` with a fixed capacity (the bucket's
``max_len``): one row per running sequence, each with its own length, so sequences join and leave between steps
and one captured graph replays whichever rows are occupied. Two ways into it:

* a prompt chunk (eager, any subset of rows): ``select`` writes each row's new tokens at their own slots, exactly
  as the eager pool does (left padding written after the row's real tokens);
* a decode step (the static step, every row): each row writes its one new token at its position, read on the
  device from the bucket's position buffer, and sees keys ``j <= position`` (within the window where a layer has
  one). A row that is not decoding (free, or its prompt still being prefilled) is fed at a slot nobody can see
  before it is overwritten: 0 for a free row (its next sequence's prompt writes slot 0 first), the next prompt
  slot for a row being prefilled (its next chunk writes it first). Its output counts for nothing (the live mask).

``StaticRows`` is the engine's pool on this path: the free list (it outlives a bucket) and the current bucket, which
is replaced by a longer one (every row's keys copied over) only when an admitted request needs more positions.
Legend: R rows, H heads, M max_len, D head dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache

from moeflow.engine.rows import FreeRows, RowKV, RowLayer

if TYPE_CHECKING:
    from moeflow.engine.static import Bucket, StaticDecoder


class StaticRowLayer(RowLayer):
    """One decoder layer of a ``StaticRowKV``: the eager pool's writes for prompt chunks, per-row position writes
    for a decode step (device ops only: a graph replays them)."""

    def __init__(self, pool: StaticRowKV):
        super().__init__(pool)
        self.pool: StaticRowKV = pool
        self.cumulative_length = torch.zeros((), dtype=torch.long)
        """Unused (positions are per row); kept because the graph capture saves and restores it."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._settle()

    def _settle(self) -> None:
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: a compiled step need not copy the cache
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:  # decode: new [R, H, 1, D] -> [R, H, M, D]
        pool = self.pool
        if not pool.decoding:
            return super().update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        # row r's token at position pos[r]: an indexed write, which torch.compile keeps in place (a scatter_ into
        # the cache was lowered to a copy of the whole cache, every layer of every step: ~1 GB at 32 rows x 256)
        rows, pos = pool.row_ids, pool.pos.view(-1)
        self.keys[rows, :, pos] = key_states[:, :, 0].to(self.keys.dtype)
        self.values[rows, :, pos] = value_states[:, :, 0].to(self.values.dtype)
        return self.keys, self.values

    def take_over(self, old: RowLayer) -> None:
        """Start from ``old``'s keys and values (a shorter bucket's): every row's first positions copied."""
        if not old.is_initialized:
            return
        assert old.keys is not None and old.values is not None
        self.device, n = old.keys.device, old.keys.shape[2]
        self.keys = old.keys.new_zeros(*old.keys.shape[:2], self.pool.max_len, old.keys.shape[-1])
        self.values = old.values.new_zeros(*old.values.shape[:2], self.pool.max_len, old.values.shape[-1])
        self.keys[:, :, :n] = old.keys
        self.values[:, :, :n] = old.values
        self.is_initialized = True
        self._settle()


class StaticRowKV(RowKV):
    """A static bucket's KV: ``rows`` x ``max_len`` (fixed), rows written at their own positions. Its own free list is
    unused: ``StaticRows`` keeps the engine's, which outlives a bucket."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, device: torch.device, pos: torch.Tensor):
        super().__init__(model, rows, max_len, device)
        self.capacity = max_len
        self.cache = Cache(layers=[StaticRowLayer(self) for _ in range(model.config.num_hidden_layers)])
        self.pos = pos
        """[R, 1] the bucket's position buffer: where each row's decode token is written."""
        self.row_ids = torch.arange(rows, device=device)
        """[R] each row's index (a static buffer the decode step's cache writes index with)."""
        self.decoding = True
        """A decode step (every row, at ``pos``) rather than a prompt chunk (``select``)."""
        self.key_len = max_len

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))  # fmt: skip

    def select(self, rows: list[int], slots: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self.decoding = False
        return super().select(rows, slots)

    def decode_mode(self) -> None:
        """The next forward is a decode step of every row (host side, before the step)."""
        self.decoding, self.key_len = True, self.max_len

    def decode_masks(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Masks [R, 1, 1, M] for one token per row at ``pos`` (device ops only: safe inside a graph)."""
        return self._masks(self.pos)

    def take_over(self, old: RowKV) -> None:
        for new_layer, old_layer in zip(self.cache.layers, old.cache.layers):
            new_layer.take_over(old_layer)


class StaticRows(FreeRows):
    """The engine's row pool on the static path: the free list and the current bucket of ``decoder``."""

    def __init__(self, decoder: StaticDecoder, rows: int, length: int = 1):
        super().__init__(rows)
        self.decoder = decoder
        self.bucket: Bucket = decoder.row_bucket(rows, length)
        self._checked = False

    @property
    def kv(self) -> StaticRowKV:
        kv = self.bucket.kv
        assert isinstance(kv, StaticRowKV)
        return kv

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    @property
    def cache(self) -> Cache:
        return self.kv.cache

    def fit(self, length: int) -> None:
        """Hold at least ``length`` positions per row: a longer bucket (rows copied) only when needed. Also follows
        a new slot table (``LLM.reconfigure``), whose buckets start afresh."""
        bucket = self.decoder.row_bucket(self.rows, max(length, self.max_len))
        if bucket is self.bucket:
            return
        new = bucket.kv
        assert isinstance(new, StaticRowKV)
        new.take_over(self.kv)
        self.decoder.drop(self.bucket)
        self.bucket, self._checked = bucket, False

    def select(self, rows: list[int], slots: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """A prompt chunk of ``rows`` written at ``slots`` (see ``RowKV.select``); returns its masks."""
        return self.kv.select(rows, slots)

    def decode(self, tokens: list[int], positions: list[int], live: list[int]) -> torch.Tensor:  # [R, V]
        """One static decode step of every row (row ``r`` feeds ``tokens[r]`` at ``positions[r]``; ``live`` rows
        count); returns the logits."""
        self.prepare()
        return self.decoder.decode_rows(self.bucket, tokens, positions, live)

    def prepare(self) -> None:
        """Ready the bucket for a decode step (its KV checked against the reserve once, the decode masks set)."""
        if not self._checked:  # the bucket's KV is allocated by now (a prompt chunk ran): within the reserve?
            self.decoder._check_kv()
            self._checked = True
        self.kv.decode_mode()
