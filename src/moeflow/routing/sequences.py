"""Recorded routing as per-request sequences: what the routing-path predictor trains on and is evaluated on.

Shapes: ``n`` tokens of a request, ``L`` layers, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.routing.trace import Trace


@dataclass
class RequestSeq:
    """One request's tokens in position order."""

    tokens: np.ndarray  # [n] token ids
    experts: np.ndarray  # [n, L, K] (-1 = not recorded)
    known: np.ndarray  # [n] bool: the previous token's routing was known before this token ran
    decode: np.ndarray  # [n] bool
    valid: np.ndarray  # [n] bool: every layer recorded
    step: np.ndarray  # [n] engine step each token ran in

    def __len__(self) -> int:
        return len(self.tokens)


def request_sequences(trace: Trace) -> list[RequestSeq]:
    """Split a trace into per-request sequences, each sorted by position."""
    seqs = []
    for r in trace.requests():
        idx = np.flatnonzero(trace.request == r)
        idx = idx[np.argsort(trace.position[idx], kind="stable")]
        ex = trace.experts[idx]
        valid = (ex >= 0).all(axis=(1, 2))
        step = trace.step[idx]
        known = np.zeros(len(idx), bool)
        known[1:] = (step[:-1] < step[1:]) & valid[:-1]
        seqs.append(RequestSeq(trace.token[idx], ex, known, trace.decode[idx].astype(bool), valid, step))
    return seqs


def load_sequences(traces: Sequence[Trace]) -> tuple[list[RequestSeq], tuple[int, int, int]]:
    """All requests of several traces of one model shape; returns (sequences, (L, E, K))."""
    if not traces:
        raise MoeflowError("no traces given; record some with `moeflow trace`")
    shape = (traces[0].num_layers, traces[0].num_experts, traces[0].top_k)
    for t in traces[1:]:
        if (t.num_layers, t.num_experts, t.top_k) != shape:
            raise MoeflowError(
                f"traces have different shapes (L, E, K): {shape} and {(t.num_layers, t.num_experts, t.top_k)}; "
                "train one predictor per model"
            )
    return [s for t in traces for s in request_sequences(t)], shape


def split_requests(
    seqs: list[RequestSeq], frac: float, seed: int
) -> tuple[list[RequestSeq], list[RequestSeq]]:
    """(rest, held-out) with about ``frac`` of the requests held out (at least one each when possible)."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_held = min(max(1, round(frac * len(seqs))), len(seqs) - 1) if len(seqs) > 1 else 0
    held = {int(i) for i in order[:n_held]}
    return [s for i, s in enumerate(seqs) if i not in held], [s for i, s in enumerate(seqs) if i in held]


def build_vocab(seqs: list[RequestSeq], max_vocab: int) -> np.ndarray:
    """The ``max_vocab`` most frequent token ids, sorted."""
    ids, counts = np.unique(np.concatenate([s.tokens for s in seqs]), return_counts=True)
    keep = ids[np.argsort(-counts, kind="stable")[:max_vocab]]
    return np.sort(keep[keep >= 0])


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., L, K] expert ids (-1 ignored) → [..., L, E] float32 0/1."""
    out = np.zeros((*experts.shape[:-1], num_experts + 1), np.float32)
    np.put_along_axis(out, np.where(experts < 0, num_experts, experts), 1.0, axis=-1)
    return out[..., :num_experts]


def prev_routing(seq: RequestSeq, num_experts: int) -> np.ndarray:
    """[n, L, E]: the previous token's routing where it was known before the token ran, else zeros."""
    hot = multi_hot(seq.experts, num_experts)
    prev = np.zeros_like(hot)
    prev[1:] = hot[:-1] * seq.known[1:, None, None]
    return prev
