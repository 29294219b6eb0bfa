"""The row KV pool of continuous batching: ``rows`` KV rows per decoder layer, each owned by one running sequence,
each with its own length. A sequence is given a row when it is admitted and gives it back when it finishes or is
aborted; the next sequence to take the row simply overwrites it.

A forward step feeds a subset of the rows (``RowKV.select``): per row ``Q`` new tokens, each written at its own
cache slot. A row's real tokens go at their positions; a left-padded chunk's padding goes *after* the row's real
tokens (slots the row's next tokens overwrite before any query can see them), so one causal rule masks every row:
query at slot ``q`` sees keys ``j <= q`` (within the sliding window where the layer has one). No row ever holds
left padding, so a row's keys are exactly its sequence's, whatever ran beside it.

The tensors are ``[R, H, C, D]`` with a capacity ``C`` that grows by doubling. The static decode path fixes ``C``
and replays one step over all rows (``static_rows.py``: the same write rule, a decode step's slots on the device).
Legend: R rows, n rows in this forward, Q new tokens per row, H heads, C capacity, D head dim, K key length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from moeflow.engine.kv import mask_windows

MIN_CAPACITY = 64


def row_inputs(
    feeds: list[tuple[list[int], int]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A forward's inputs for rows each feeding ``(tokens, first position)``: ids [n, Q] (left-padded to the
    longest), the cache slot of every column [n, Q] (a row's padding goes to the slots after its real tokens, within
    ``max_len``) and which columns are real [n, Q]."""
    width = max(len(new) for new, _ in feeds)
    ids = torch.zeros(len(feeds), width, dtype=torch.long)
    slots = torch.zeros(len(feeds), width, dtype=torch.long)
    keep = torch.ones(len(feeds), width, dtype=torch.bool)
    for b, (new, start) in enumerate(feeds):
        n = len(new)
        pad = width - n
        ids[b, pad:] = torch.tensor(new)
        after = torch.arange(start + n, start + n + pad).clamp_(max=max_len - 1)
        slots[b] = torch.cat([after, torch.arange(start, start + n)])
        keep[b, :pad] = False
    return ids, slots, keep


class RowLayer(CacheLayerMixin):
    """One decoder layer's keys and values of every row; ``update`` writes the selected rows' new tokens."""

    is_compileable = False
    is_sliding = False

    def __init__(self, pool: RowKV):
        super().__init__()
        self.pool = pool

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, cap = self.pool.rows, self.pool.capacity
        heads, dk, dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros(rows, heads, cap, dk)
        self.values = value_states.new_zeros(rows, heads, cap, dv)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:  # new [n, H, Q, D] -> [n, H, K, D]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        pool = self.pool
        if (
            self.keys.shape[2] < pool.capacity
        ):  # grown since this layer last ran: copy into the larger tensors
            keys = self.keys.new_zeros(*self.keys.shape[:2], pool.capacity, self.keys.shape[-1])
            values = self.values.new_zeros(*self.values.shape[:2], pool.capacity, self.values.shape[-1])
            keys[:, :, : self.keys.shape[2]] = self.keys
            values[:, :, : self.values.shape[2]] = self.values
            self.keys, self.values = keys, values
        rows, slots = pool.sel_rows, pool.sel_slots  # [n, 1], [n, Q]
        self.keys[rows, :, slots] = key_states.transpose(1, 2).to(self.keys.dtype)  # [n, Q, H, D]
        self.values[rows, :, slots] = value_states.transpose(1, 2).to(self.values.dtype)
        k = pool.key_len
        if pool.sel_range is not None:  # consecutive rows: a view, no copy
            a, b = pool.sel_range
            return self.keys[a:b, :, :k], self.values[a:b, :, :k]
        index = rows[:, 0]
        return self.keys[index, :, :k], self.values[index, :, :k]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool.key_len, 0

    def get_seq_length(self) -> int:
        return self.pool.key_len

    def get_max_length(self) -> int:
        return -1


class FreeRows:
    """The free list of ``rows`` KV rows: a running sequence holds one from admission to its end."""

    def __init__(self, rows: int):
        self.rows = rows
        self._free = list(range(rows))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free row (the lowest, so a small batch stays in consecutive rows)."""
        if not self._free:
            raise RuntimeError("no free KV row")
        self._free.sort()
        return self._free.pop(0)

    def give_back(self, row: int) -> None:
        if row in self._free or not 0 <= row < self.rows:
            raise RuntimeError(f"KV row {row} is not taken")
        self._free.append(row)


class RowKV(FreeRows):
    """The pool: ``rows`` rows of up to ``max_len`` positions, their free list, and the per-forward selection."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, device: torch.device):
        super().__init__(rows)
        config = model.config
        self.max_len, self.device = max_len, device
        self.capacity = min(MIN_CAPACITY, max_len)
        self.cache = Cache(layers=[RowLayer(self) for _ in range(config.num_hidden_layers)])
        self.windows = mask_windows(model)
        self.additive = None if config._attn_implementation == "sdpa" else model.dtype
        self.sel_rows = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.sel_slots = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.sel_range: tuple[int, int] | None = None
        self.key_len = 0

    # -------------------------------------------------------------------------------- forward
    def select(self, rows: list[int], slots: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The next forward feeds ``rows`` [n] writing at ``slots`` [n, Q] (host tensor); returns its masks."""
        need = int(slots.max()) + 1
        if need > self.max_len:
            raise RuntimeError(f"slot {need - 1} is past the KV pool's {self.max_len} positions")
        while self.capacity < need:
            self.capacity = min(self.max_len, self.capacity * 2)
        self.key_len = need
        self.sel_range = (
            (rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None
        )
        self.sel_rows = torch.tensor(rows, dtype=torch.long).reshape(-1, 1).to(self.device)
        self.sel_slots = slots.to(self.device)
        return self._masks(self.sel_slots)

    def _masks(self, q: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        j = torch.arange(self.key_len, device=self.device)[None, None, :]  # [1, 1, K]
        qi = q[:, :, None]  # [n, Q, 1]
        out = {}
        for name, window in self.windows.items():
            allowed = j <= qi
            if window is not None:
                allowed = allowed & (qi - j < window)
            mask = allowed[:, None]  # [n, 1, Q, K]
            if self.additive is not None:
                mask = torch.zeros(mask.shape, dtype=self.additive, device=self.device).masked_fill(
                    ~mask, torch.finfo(self.additive).min
                )
            out[name] = mask
        return out.get("", out)
