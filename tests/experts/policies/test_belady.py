"""Belady's MIN: optimal on small sequences (checked by exhaustive search) and never beaten by other policies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeflow.errors import MoeflowError
from moeflow.experts.cache import PolicyContext
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.belady import BeladyPolicy
from moeflow.routing.trace import Trace
from moeflow.sim import simulate


def make_trace(lengths: list[int], experts: np.ndarray, num_experts: int) -> Trace:
    """Decode-only requests of ``lengths`` tokens; ``experts`` [N, L, K] rows in request order."""
    req = np.concatenate([np.full(n, r) for r, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    n = len(req)
    return Trace("test", num_experts, experts.shape[2], req, pos, np.ones(n, bool), np.arange(n),
                 np.full(n, -1), experts, np.ones(experts.shape, np.float32))  # fmt: skip


def optimal_misses(seq: list[int], slots: int) -> int:
    """Fewest misses of any demand-paging policy, by search over cache contents."""
    states = {frozenset(): 0}
    for key in seq:
        nxt: dict[frozenset, int] = {}
        for cache, misses in states.items():
            if key in cache:
                options = [(cache, misses)]
            elif len(cache) < slots:
                options = [(cache | {key}, misses + 1)]
            else:
                options = [((cache - {old}) | {key}, misses + 1) for old in cache]
            for state, m in options:
                nxt[state] = min(m, nxt.get(state, m))
        states = nxt
    return min(states.values())


@pytest.mark.parametrize("seed", range(6))
def test_belady_equals_the_exhaustive_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 5, size=14).tolist()
    trace = make_trace([len(seq)], np.array(seq).reshape(-1, 1, 1), 5)
    for slots in (1, 2, 3):
        assert simulate(trace, "belady", slots).misses == optimal_misses(seq, slots)


def test_belady_textbook_sequence() -> None:
    seq = [
        7,
        0,
        1,
        2,
        0,
        3,
        0,
        4,
        2,
        3,
        0,
        3,
        2,
        1,
        2,
        0,
        1,
        7,
        0,
        1,
    ]  # Silberschatz: OPT with 3 frames = 9 faults
    trace = make_trace([len(seq)], np.array(seq).reshape(-1, 1, 1), 8)
    assert simulate(trace, "belady", 3).misses == 9
    assert simulate(trace, "lru", 3).misses == 12


def structured(rng: np.random.Generator, n: int, layers: int, experts: int) -> np.ndarray:
    """[n, L, 2] routing with locality: each layer keeps one expert for a while and draws the other."""
    out = np.empty((n, layers, 2), int)
    sticky = rng.integers(0, experts, size=layers)
    for t in range(n):
        change = rng.random(layers) < 0.2
        sticky[change] = rng.integers(0, experts, size=change.sum())
        other = (sticky + 1 + rng.integers(0, experts - 1, size=layers)) % experts
        out[t, :, 0], out[t, :, 1] = sticky, other
    return out


@pytest.mark.parametrize(("kind", "seed"), itertools.product(["random", "structured"], range(3)))
def test_belady_never_beaten(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, experts, lengths = 4, 6, [12, 9, 15]
    n = sum(lengths)
    if kind == "random":
        routing = np.stack([rng.permutation(experts)[:2] for _ in range(n * layers)]).reshape(n, layers, 2)
    else:
        routing = structured(rng, n, layers, experts)
    trace = make_trace(lengths, routing, experts)
    for batch, slots in itertools.product((1, 2), (2, 5, 9, 16)):
        best = simulate(trace, "belady", slots, batch).misses
        for name in ("lru", "lfu"):
            assert simulate(trace, name, slots, batch).misses >= best
        # caching alone: demand misses; with prefetching: every load (misses + prefetches)
        assert simulate(trace, "moe-infinity", slots, batch, options={"prefetch": 0}).misses >= best
        assert simulate(trace, "moe-infinity", slots, batch).loads >= best


def test_belady_needs_the_trace() -> None:
    pol = make_policy("belady")
    assert isinstance(pol, BeladyPolicy)
    pol.bind(4, 2, 4, 2)
    with pytest.raises(MoeflowError, match="simulator"):
        pol.setup(PolicyContext(model_dir="x"))
