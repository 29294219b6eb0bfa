"""Perplexity of a model over a token sequence, through the engine (offloaded, possibly quantised experts).

Sliding windows, as llama.cpp's ``llama-perplexity`` and transformers' strided evaluation do: windows of ``context``
tokens start every ``stride`` tokens; each scores only the tokens the previous window did not, so every token after
the first is scored exactly once, with at least ``context - stride`` tokens before it (all tokens before it in the
first window). With the default stride of half the context, each token sees at least half a context, as in
``llama-perplexity``'s scoring of each chunk's second half.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moeflow.errors import RequestError


@dataclass(frozen=True)
class Perplexity:
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Tokens scored."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict[str, float | int]:
        return {"nll": self.nll, "ppl": self.ppl, "tokens": self.tokens}


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over ``n`` tokens; a position p scores token p + 1."""
    if context < 2 or not 1 <= stride <= context:
        raise RequestError(
            f"need context >= 2 and 1 <= stride <= context, got context {context}, stride {stride}"
        )
    scored = 0  # positions before this one have been scored
    start = 0
    while scored < n - 1:
        end = min(start + context, n)
        yield start, end, scored
        scored = end - 1
        start += stride
        if end == n:
            break


@torch.inference_mode()
def window_logprobs(
    model: torch.nn.Module, ids: list[int], start: int, end: int, device: torch.device
) -> torch.Tensor:
    """Log-probabilities [end - start, V] (float32) of the next token at each position of ``ids[start:end]``."""
    x = torch.tensor([ids[start:end]], device=device)
    out = model(input_ids=x, use_cache=False)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def perplexity(
    model: torch.nn.Module, ids: list[int], context: int, stride: int, device: torch.device
) -> Perplexity:
    """Mean NLL per token of ``ids`` under ``model`` (an engine's ``loaded.model``) with sliding windows."""
    if len(ids) < 2:
        raise RequestError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    total, count = 0.0, 0
    for start, end, first in windows(len(ids), context, stride):
        logp = window_logprobs(model, ids, start, end, device)
        pos = torch.arange(first - start, end - start - 1, device=logp.device)
        target = torch.tensor(ids[first + 1 : end], device=logp.device)
        total -= float(logp[pos, target].double().sum())
        count += len(pos)
    return Perplexity(total / count, count)
