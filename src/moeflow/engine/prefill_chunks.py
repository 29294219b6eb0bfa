"""Prefill in column chunks, so that a batch of long prompts keeps its activations inside the device budget.

A device budget keeps a reserve beside the weights and the expert slots for the KV cache and the activations
(``memory.plan_memory``). The decode step's activations are small and fixed; a prefill's grow with the batch's
prompt tokens (on the H200, about 0.13 MB per token at OLMoE geometry: 8 prompts of 512 tokens went 408 MiB over a
4.2 GB budget). Where the reserve left after the KV cache cannot hold one forward over every prompt column, the
static path's eager prefill runs the left-padded prompts a block of columns at a time, each block one engine step
(its own routing, replay rows and policy hooks), every block writing its keys into the static cache after the last.
The final block's logits are the prompts' last.
Legend: B sequences, S padded prompt width, H hidden size, K top-k.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from moeflow.engine.step import Steps
from moeflow.inputs import StepInputs
from moeflow.model.loader import LoadedModel
from moeflow.sequence import Sequence

if TYPE_CHECKING:  # the static decoder calls into this module, not the other way round
    from moeflow.engine.static import Bucket, StaticDecoder

LONG_PREFILL = 1024
"""Prefills of at least this many tokens show a progress bar (with progress on)."""

SAFETY = 2
"""The per-token activation estimate is multiplied by this (allocator rounding, temporaries it does not count)."""


def activation_bytes_per_token(lm: LoadedModel, max_len: int) -> int:
    """Device bytes one prompt token's activations may take in a prefill forward, estimated from the geometry: its
    K experts' intermediate outputs (the gated projection, its activation, the down projection), a few hidden-size
    vectors (residual, norms, attention projections) and one row of attention scores in float32 over ``max_len``
    keys (in case attention falls back to the math kernel), times ``SAFETY``."""
    cfg = lm.config
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    per_expert = lm.layout.numel // hidden + hidden  # 3I + H for a gated expert (I its intermediate size)
    size = lm.dtype.itemsize * (lm.top_k * per_expert + 16 * hidden) + 4 * heads * max_len
    return SAFETY * size


def kv_bytes_estimate(lm: LoadedModel, rows: int, max_len: int) -> int:
    """Bytes a static KV cache of ``rows`` x ``max_len`` takes, from the attention geometry (an estimate: the
    cache's real size is known once its first forward has allocated it)."""
    cfg = lm.config
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers) * 2 * rows * max_len * kv_heads * head_dim * lm.dtype.itemsize


def columns(room: int, rows: int, per_token: int, width: int) -> int:
    """Prompt columns one forward may take: ``width`` if ``room`` bytes hold them all, else as many as fit (>= 1)."""
    if room >= rows * width * per_token:
        return width
    return max(1, room // max(rows * per_token, 1))


def chunk_inputs(
    x: StepInputs, seqs: list[Sequence], start: int, stop: int
) -> tuple[list[Sequence], StepInputs]:
    """The prefill ``x`` of ``seqs`` (left-padded to ``S`` columns) restricted to columns ``[start, stop)``: the
    sequences with a real token there, and the block's inputs (the attention mask covers columns ``[0, stop)``)."""
    width = x.ids.shape[1]
    live, tokens, positions = [], [], []
    for s in seqs:
        first = width - len(s.prompt_ids)  # the column of the sequence's first token
        lo, hi = max(0, start - first), max(0, stop - first)
        if hi > lo:
            live.append(s)
            tokens.append(s.prompt_ids[lo:hi])
            positions.append(list(range(lo, hi)))
    real = x.mask[:, start:stop].bool()
    keep = None if bool(real.all()) else real.flatten()
    block = replace(x, ids=x.ids[:, start:stop], mask=x.mask[:, :stop], positions=x.positions[:, start:stop],
                    keep=keep, new_tokens=tokens, new_positions=positions)  # fmt: skip
    return live, block


def prefill_columns(decoder: StaticDecoder, bucket: Bucket, width: int) -> int:
    """Prompt columns one prefill forward into ``bucket`` may take: all ``width``, unless the KV reserve of the device
    budget, less the static caches (this bucket's estimated while not allocated yet), cannot hold their
    activations."""
    if decoder.kv_budget is None:
        return width
    kv, lm = bucket.kv, decoder.lm
    pending = 0 if kv.bytes() else kv_bytes_estimate(lm, kv.rows, kv.max_len)
    room = max(0, decoder.kv_budget - decoder.kv_bytes() - pending)
    return columns(room, kv.rows, activation_bytes_per_token(lm, kv.max_len), width)


def chunked_prefill(
    decoder: StaticDecoder, steps: Steps, bucket: Bucket, seqs: list[Sequence], x: StepInputs, progress: bool
) -> torch.Tensor:  # [B, V]
    """The static path's prefill ``x`` of ``seqs`` a block of prompt columns at a time, each block one step through
    the eager MoE layers, sized so its activations fit the device budget; the last block's logits."""
    start, width = 0, x.ids.shape[1]
    tokens = sum(len(t) for t in x.new_tokens)
    bar = tqdm(total=width, desc=f"prefill {tokens} tokens", unit="column", leave=False, mininterval=0,
               disable=not (progress and tokens >= LONG_PREFILL))  # fmt: skip
    while start < width:
        stop = start + prefill_columns(decoder, bucket, width - start)
        live, block = chunk_inputs(x, seqs, start, stop)
        steps.begin(live, block.new_tokens, block.new_positions, True, block.keep)
        decoder.rt.prefetch_after(-1)
        logits = decoder.prefill(bucket, block.ids, x.mask, block.positions, start=start)
        steps.end()
        bar.update(stop - start)
        start = stop
    bar.close()
    return logits
