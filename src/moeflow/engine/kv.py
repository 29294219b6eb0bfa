"""The static KV cache of the static decode path, and the attention masks built for it.

One transformers ``StaticLayer`` per decoder layer, ``rows`` sequences x ``max_len`` positions, allocated at the
first prefill and reused by every batch of the same shape (a captured graph keeps its addresses). All rows write
position ``p`` of the cache at step ``p`` (prompts are left-padded), so a row's keys are valid where its prompt was
not padding. Masks are 4-D (transformers uses a 4-D mask as given; boolean for sdpa, additive floats for eager
attention): causal, padding, and each layer
type's sliding window, computed on the device from the cache's own write position so a graph can replay them.
Legend: B rows, S prompt width, M max_len.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer


class StaticKV:
    """A reusable static cache for ``rows`` sequences of up to ``max_len`` positions, with its masks."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, device: torch.device):
        config = model.config
        self.rows, self.max_len, self.device = rows, max_len, device
        self.cache = Cache(layers=[StaticLayer(max_len) for _ in range(config.num_hidden_layers)])
        self.windows = mask_windows(model)
        self.additive = None if config._attn_implementation == "sdpa" else model.dtype
        """Eager attention adds its mask to the scores: a float mask of this dtype (0 or its minimum); sdpa: bool."""
        """Mask name -> sliding window (None: full causal); the name "" means one mask for every layer."""
        self.key_ok = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        """[B, M] positions holding a real key (not left padding), decode positions included."""

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))  # fmt: skip

    def reset(self, pad: torch.Tensor) -> None:
        """A new batch: ``pad`` [B, S] is 1 where the left-padded prompt has a real token."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        self.key_ok.fill_(True)
        self.key_ok[:, : pad.shape[1]] = pad.to(self.device, torch.bool)

    def position(self) -> torch.Tensor:
        """The cache index the next token is written at (a device scalar once the cache holds anything)."""
        layer = self.cache.layers[0]
        return layer.cumulative_length if layer.is_initialized else torch.zeros((), dtype=torch.long)

    def prefill_masks(self, width: int, start: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
        """Masks for ``width`` prompt columns from column ``start`` (a block of a chunked prefill)."""
        q = torch.arange(start, start + width, device=self.device)
        return self._masks(q)

    def decode_masks(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Masks for one new token per row at ``position()`` (device ops only: safe inside a graph)."""
        return self._masks(self.position().to(self.device).reshape(1))

    def _masks(self, q: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        j = torch.arange(self.max_len, device=self.device)[None, :]  # [1, M]
        qi = q[:, None]  # [Q, 1]
        out = {}
        for name, window in self.windows.items():
            allowed = j <= qi
            if window is not None:
                allowed = allowed & (qi - j < window)
            allowed = (allowed[None] & self.key_ok[:, None, :]) | (j == qi)[
                None
            ]  # a query always sees itself
            mask = allowed[:, None]  # [B, 1, Q, M]
            if self.additive is not None:
                mask = torch.zeros(mask.shape, dtype=self.additive, device=self.device).masked_fill(
                    ~mask, torch.finfo(self.additive).min
                )
            out[name] = mask
        return out.get("", out)


def mask_windows(model: nn.Module) -> dict[str, int | None]:
    """How the model's forward takes its masks: one for all layers (sliding when ``config.sliding_window`` is set,
    as Mixtral's and Qwen3-MoE's forward do) or one per layer type (a dict keyed by ``config.layer_types``)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    base = getattr(model, "model", model)
    per_type = "causal_mask_mapping" in inspect.getsource(type(base).forward)
    if per_type:
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return {t: (window if t == "sliding_attention" else None) for t in types}
    uses_window = "create_sliding_window_causal_mask" in inspect.getsource(type(base).forward)
    return {"": window if uses_window else None}
