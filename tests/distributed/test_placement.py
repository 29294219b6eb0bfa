"""Expert placement: one home per expert, per-layer balance from popularity, traces, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moeflow.distributed.placement import from_trace, place, uniform
from moeflow.errors import ConfigError, TraceError
from moeflow.routing.trace import Trace


def test_uniform_deals_experts_round_robin() -> None:
    p = uniform(3, 8, 2)
    assert p.home.tolist() == [[0, 1, 0, 1, 0, 1, 0, 1]] * 3
    assert p.keys(1)[:2] == [(0, 1), (0, 3)]
    assert len(p.keys(0)) + len(p.keys(1)) == 24
    assert (p.mine(0) ^ p.mine(1)).all()


def test_skewed_popularity_is_balanced_per_layer() -> None:
    pop = np.array([[10, 1, 1, 1, 1, 1, 1, 4], [1, 1, 1, 1, 1, 1, 1, 1]], float)
    p = place(pop, 2)
    # layer 0: 10 alone against 4+1*6=10; the popular experts land on different ranks
    assert p.load(pop)[0].tolist() == [10.0, 10.0]
    assert p.home[0, 0] != p.home[0, 7]
    assert p.load(pop)[1].tolist() == [4.0, 4.0]


@given(
    arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 16)), elements=st.floats(0, 1000)),
    st.integers(1, 5),
)
def test_every_expert_has_one_home_and_the_load_is_within_greedy_bound(pop: np.ndarray, world: int) -> None:
    p = place(pop, world)
    assert p.home.shape == pop.shape
    assert ((p.home >= 0) & (p.home < world)).all()
    load = p.load(pop)
    assert np.allclose(load.sum(axis=1), pop.sum(axis=1))
    # largest-first greedy: the busiest rank exceeds the per-rank mean by at most one expert's popularity
    assert (load.max(axis=1) <= pop.sum(axis=1) / world + pop.max(axis=1) + 1e-6).all()
    assert place(pop, world).home.tolist() == p.home.tolist()  # deterministic: every rank computes the same


def test_placement_from_a_trace_follows_its_counts() -> None:
    experts = np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[0, -1]]], np.int16)  # [N=4, L=1, K=2]; -1 unrecorded
    n = len(experts)
    trace = Trace("m", 4, 2, np.zeros(n, np.int32), np.arange(n, dtype=np.int32), np.ones(n, bool),
                  np.arange(n, dtype=np.int32), np.full(n, -1, np.int32), experts, np.ones(experts.shape, np.float32))  # fmt: skip
    p = from_trace(trace, 1, 4, 2)
    assert p.home[0, 0] != p.home[0, 1]  # expert 0 (4 uses) alone on a rank, the rest (3 uses) on the other
    assert p.home[0, 1] == p.home[0, 2] == p.home[0, 3]
    with pytest.raises(TraceError, match="record a trace of this model"):
        from_trace(trace, 2, 4, 2)


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="non-negative"):
        place(np.array([[1.0, -1.0]]), 2)
    with pytest.raises(ConfigError, match="world size"):
        place(np.ones((1, 2)), 0)
    with pytest.raises(ConfigError, match="layers, experts"):
        place(np.ones(3), 2)
