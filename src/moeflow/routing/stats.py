"""Routing statistics of a trace, each next to what random routing would give (``trace_stats``).

Per MoE layer (and averaged over layers):

- ``entropy_ratio``: entropy of expert usage (all K choices of every token) over log2(E); random: 1.
- ``top_share``: share of all selections that went to the most-used expert; random: 1/E.
- ``first_repeat``: consecutive tokens of a request (positions p, p+1) with the same first choice; random: 1/E.
- ``any_repeat``: consecutive tokens sharing at least one expert; random: 1 - C(E-K, K) / C(E, K).
- ``next_layer_first``: the first choice at layer l+1 guessed from the first choice at layer l by a table
  (most frequent successor) learned on one half of the requests and scored on the other, both ways, pooled
  (one request: its first and second halves); random: 1/E. Undefined (None) for the last layer.
- ``lru_hit_{c}``: hit ratio of a per-layer LRU cache of c experts, tokens in trace order, each token requesting
  its K experts (first choice first); random: c/E.

Pure NumPy. Values that cannot be computed (no consecutive pairs, a single token) are None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moeflow.errors import TraceError
from moeflow.routing.trace import Trace

STATS = ("entropy_ratio", "top_share", "first_repeat", "any_repeat", "next_layer_first")


def default_cache_sizes(num_experts: int, top_k: int) -> list[int]:
    """K, 2K and a quarter, half and three quarters of E (those in [K, E))."""
    cands = {top_k, 2 * top_k, num_experts // 4, num_experts // 2, 3 * num_experts // 4}
    return sorted(c for c in cands if top_k <= c < num_experts)


def _check(trace: Trace) -> None:
    if trace.num_tokens == 0:
        raise TraceError("the trace holds no tokens")
    e = trace.experts
    if e.min() < 0 or e.max() >= trace.num_experts:
        raise TraceError(
            f"trace expert ids span {e.min()}..{e.max()} but num_experts is {trace.num_experts} "
            "(-1 means a layer was never recorded)"
        )


def usage_counts(trace: Trace) -> np.ndarray:
    """[L, E] number of times each expert was chosen (any of the K choices) per layer."""
    n, num_layers, k = trace.experts.shape
    layer_idx = np.broadcast_to(np.arange(num_layers)[None, :, None], (n, num_layers, k))
    flat = layer_idx.ravel() * trace.num_experts + trace.experts.ravel()
    return np.bincount(flat, minlength=num_layers * trace.num_experts).reshape(num_layers, trace.num_experts)


def entropy_ratio(counts: np.ndarray) -> np.ndarray:
    """[L] usage entropy over log2(E) from [L, E] counts."""
    p = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(-1)
    return h / math.log2(counts.shape[1])


def consecutive_pairs(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (a, b) [P] of token pairs of the same request at positions p and p+1."""
    order = np.lexsort((trace.position, trace.request))
    req, pos = trace.request[order], trace.position[order]
    ok = (req[1:] == req[:-1]) & (pos[1:] == pos[:-1] + 1)
    return order[:-1][ok], order[1:][ok]


def repeat_rates(trace: Trace) -> tuple[np.ndarray, np.ndarray, int]:
    """([L] same-first-choice rate, [L] any-shared-expert rate, number of pairs) over consecutive tokens."""
    a, b = consecutive_pairs(trace)
    if len(a) == 0:
        nan = np.full(trace.num_layers, np.nan)
        return nan, nan, 0
    ea, eb = trace.experts[a], trace.experts[b]  # [P, L, K]
    first = (ea[:, :, 0] == eb[:, :, 0]).mean(0)
    shared = (ea[:, :, :, None] == eb[:, :, None, :]).any(axis=(2, 3)).mean(0)
    return first, shared, len(a)


def _halves(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks of two disjoint halves: by request, or a single request split by position."""
    reqs = trace.requests()
    if len(reqs) >= 2:
        first = np.isin(trace.request, np.asarray(reqs[: len(reqs) // 2]))
        return first, ~first
    median_pos = np.sort(trace.position)[trace.num_tokens // 2]
    first = trace.position < median_pos
    return first, ~first


def _successor_table(first: np.ndarray, num_experts: int) -> np.ndarray:
    """[L-1, E] most frequent first choice at l+1 given first choice e at l, from [N, L] first choices.
    Choices never seen at l fall back to the most frequent first choice at l+1."""
    n, num_layers = first.shape
    counts = np.zeros((num_layers - 1, num_experts, num_experts), np.int64)
    layer = np.broadcast_to(np.arange(num_layers - 1), (n, num_layers - 1))
    np.add.at(counts, (layer, first[:, :-1], first[:, 1:]), 1)
    table = counts.argmax(-1)  # [L-1, E]
    fallback = counts.sum(1).argmax(-1)  # [L-1]
    unseen = counts.sum(-1) == 0
    return np.where(unseen, fallback[:, None], table)


def next_layer_predictability(trace: Trace) -> np.ndarray:
    """[L-1] held-out accuracy of guessing layer l+1's first choice from layer l's (two folds, pooled)."""
    if trace.num_layers < 2 or trace.num_tokens < 2:
        return np.full(max(trace.num_layers - 1, 0), np.nan)
    first = trace.experts[:, :, 0]  # [N, L]
    correct = np.zeros(trace.num_layers - 1)
    total = 0
    for train, test in (_halves(trace), _halves(trace)[::-1]):
        if not train.any() or not test.any():
            continue
        table = _successor_table(first[train], trace.num_experts)
        ft = first[test]  # [T, L]
        guess = table[np.arange(trace.num_layers - 1), ft[:, :-1]]  # [T, L-1]
        correct += (guess == ft[:, 1:]).sum(0)
        total += len(ft)
    return correct / total if total else np.full(trace.num_layers - 1, np.nan)


def lru_stack_ranks(trace: Trace) -> np.ndarray:
    """[N, L, K] LRU stack distance of each request: how many distinct experts of the layer were used more
    recently (E if never used before). A per-layer LRU cache of c >= K experts hits exactly when rank < c."""
    n, num_layers, k = trace.experts.shape
    last = np.full((num_layers, trace.num_experts), -1, np.int64)  # [L, E] time of last use
    ranks = np.empty((n, num_layers, k), np.int64)
    rows = np.arange(num_layers)[:, None]
    times = np.arange(k)  # first choice used first, so later choices end up more recent
    for t in range(n):
        req = trace.experts[t]  # [L, K]
        lt = last[rows, req]  # [L, K]
        rank = (last[:, None, :] > lt[:, :, None]).sum(-1)  # [L, K]
        ranks[t] = np.where(lt >= 0, rank, trace.num_experts)
        last[rows, req] = t * k + times
    return ranks


def _clean(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _summary(values: np.ndarray, reference: float) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {"mean": None, "min": None, "max": None, "random": _clean(reference)}
    return {
        "mean": _clean(finite.mean()),
        "min": _clean(finite.min()),
        "max": _clean(finite.max()),
        "random": _clean(reference),
    }


def trace_stats(trace: Trace, cache_sizes: list[int] | None = None) -> dict[str, Any]:
    """All statistics (see the module docstring) as a JSON-ready dict: ``layers`` (one dict per MoE layer),
    ``overall`` ({stat: {mean, min, max, random}}) and the trace's shape."""
    _check(trace)
    e, k = trace.num_experts, trace.top_k
    sizes = default_cache_sizes(e, k) if cache_sizes is None else sorted(set(cache_sizes))
    bad = [c for c in sizes if not k <= c <= e]
    if bad:
        raise TraceError(f"cache sizes {bad} are outside [top_k={k}, num_experts={e}]")
    per: dict[str, np.ndarray] = {}
    counts = usage_counts(trace)
    per["entropy_ratio"] = entropy_ratio(counts)
    per["top_share"] = counts.max(-1) / counts.sum(-1)
    per["first_repeat"], per["any_repeat"], n_pairs = repeat_rates(trace)
    per["next_layer_first"] = np.append(next_layer_predictability(trace), np.nan)
    ranks = lru_stack_ranks(trace)
    for c in sizes:
        per[f"lru_hit_{c}"] = (ranks < c).mean(axis=(0, 2))
    random = {
        "entropy_ratio": 1.0,
        "top_share": 1 / e,
        "first_repeat": 1 / e,
        "any_repeat": 1 - math.comb(e - k, k) / math.comb(e, k),
        "next_layer_first": 1 / e,
        **{f"lru_hit_{c}": c / e for c in sizes},
    }
    layer_ids = trace.moe_layer_ids if trace.moe_layer_ids is not None else np.arange(trace.num_layers)
    layers = [
        {"layer": i, "model_layer": int(layer_ids[i]), **{name: _clean(v[i]) for name, v in per.items()}}
        for i in range(trace.num_layers)
    ]
    return {
        "model": trace.model,
        "num_tokens": trace.num_tokens,
        "num_requests": len(trace.requests()),
        "num_decode_tokens": int(trace.decode.sum()),
        "num_layers": trace.num_layers,
        "num_experts": e,
        "top_k": k,
        "consecutive_pairs": n_pairs,
        "cache_sizes": sizes,
        "stats": list(per),
        "layers": layers,
        "overall": {name: _summary(v, random[name]) for name, v in per.items()},
    }
