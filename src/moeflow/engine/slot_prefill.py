"""Prefill through the slot table: a static decoder's prompt runs its MoE layers as a decode step does, with the
device-side slot table and no host sync inside the forward; the policy learns the prefill's routing afterwards,
from one read-back (``CachePolicy.settle_step``), instead of observing and loading before every layer.

The eager prefill waits for the host at every MoE layer (the routing is read back, the policy plans, missing experts
are loaded), so the GPU idles while the host works and the host idles while the GPU works. Through the slot table the
whole prefill is queued at once. The kernel reads a missed expert once per tile of ``BLOCK_M`` of its tokens, from
host memory when it is not resident, so "auto" takes this path only when the pool holds every expert (misses are
then at most first touches, each written into a free slot as it is read) and the prompt's (token, expert) pairs fit
the routing kernel's one-program sort (``MAX_PAIRS``).
Legend: L MoE layers, T prefill tokens (batch x width, padding included), K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from moeflow.experts.layer import StaticBuffers

if TYPE_CHECKING:
    from moeflow.engine.static import StaticDecoder

MAX_PAIRS = 16384
"""Most (token, expert) pairs of a prefill that "auto" sends through the slot table (the routing kernel sorts a
layer's pairs in one program)."""

PREFILL_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3, "COMPACT": 1}
"""Tiles of the full-precision slot kernel for prefill-sized layers: up to 128 tokens of an expert per weight read
(decode's tiles take 16). The fastest of five options on the H200 at 128 and 512 tokens, OLMoE geometry, every
expert resident (``ttft-h200.json``: 31.0 ms at 512 tokens against 32.9 for 64x64x64, 4 warps)."""


def wants_slots(mode: str, decoder: StaticDecoder, pairs: int) -> bool:
    """Whether a prefill of ``pairs`` (token, expert) pairs runs through the slot table under ``mode``."""
    if mode != "auto":
        return mode == "slots"
    lm, store = decoder.lm, decoder.rt.store
    every = store.num_slots >= len(lm.layers) * lm.num_experts
    return lm.device.type == "cuda" and decoder.table.zero_copy and every and pairs <= MAX_PAIRS


def prefill_buffers(decoder: StaticDecoder, tokens: int, keep: torch.Tensor | None) -> StaticBuffers:
    """The static buffers of one prefill of ``tokens`` rows (``keep``: the real ones, None: all)."""
    lm, rt, dev = decoder.lm, decoder.rt, decoder.lm.device
    shape = (len(lm.layers), tokens, lm.top_k)
    tiles = decoder.prefill_blocks if rt.store.codec is None else None  # the quantised kernel keeps its own
    return StaticBuffers(
        tensors=decoder.table.tensors,
        live=keep if keep is not None else torch.ones(tokens, dtype=torch.bool, device=dev),
        route_ids=torch.zeros(shape, dtype=torch.long, device=dev),
        route_w=torch.zeros(shape, dtype=torch.float32, device=dev) if rt.recorder is not None else None,
        replay_ids=torch.zeros(shape, dtype=torch.long, device=dev) if rt.replay is not None else None,
        replay_w=torch.zeros(shape, dtype=torch.float32, device=dev) if rt.replay is not None else None,
        blocks=tiles,
    )


def real_rows(bufs: StaticBuffers, keep: torch.Tensor | None) -> list[int]:
    """Indices of the prefill's real rows (host side: known before the forward, so reading them costs no wait)."""
    tokens = bufs.route_ids.shape[1]
    return list(range(tokens)) if keep is None else np.flatnonzero(keep.cpu().numpy()).tolist()
