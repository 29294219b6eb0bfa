"""LRU prefetching by routing forecasts (``lru-forecast``): what a forecast expects is loaded before its layer,
nothing without one, and an exact forecast removes every miss the cache has room to avoid."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.plan import Forecast
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.gated import ForecastLRU
from moeflow.sim import simulate
from tests.sim.test_simulator import make_trace


def random_trace(seed: int = 0, layers: int = 4, experts: int = 8, k: int = 2):
    rng = np.random.default_rng(seed)
    rows = 3 * (4 + 12)
    chosen = np.stack(
        [np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(rows)]
    )
    return make_trace([(4, 12)] * 3, chosen, experts)


def one_hot(trace) -> np.ndarray:
    """[N, L, E] a forecast that knows the routing."""
    out = np.zeros((*trace.experts.shape[:2], trace.num_experts), np.float32)
    n, layers, _ = trace.experts.shape
    out[np.arange(n)[:, None, None], np.arange(layers)[None, :, None], trace.experts] = 1.0
    return out


def test_an_exact_forecast_leaves_no_miss_where_lru_misses() -> None:
    trace = random_trace()
    lru = simulate(trace, "lru", cache_size=8)
    exact = simulate(trace, "lru-forecast", cache_size=8, forecast=one_hot(trace))
    assert lru.misses > 0 and exact.misses == 0
    assert exact.prefetches > 0 and exact.prefetch_hits > 0


def test_without_a_forecast_it_is_lru() -> None:
    trace = random_trace(1)
    lru = simulate(trace, "lru", cache_size=6)
    for forecast in (None, np.zeros((*trace.experts.shape[:2], trace.num_experts), np.float32)):
        got = simulate(trace, "lru-forecast", cache_size=6, forecast=forecast)
        assert (got.hits, got.misses, got.prefetches) == (lru.hits, lru.misses, 0)


def test_it_loads_the_likely_experts_of_the_forecast_layer_only() -> None:
    pol = make_policy("lru-forecast")
    pol.bind(num_slots=4, num_layers=3, num_experts=6, top_k=2)
    assert isinstance(pol, ForecastLRU)
    scores = np.array([[0.9, 0.1, 0.6, 0.0, 0.0, 0.4], [0.8, 0.0, 0.0, 0.0, 0.0, 0.3]], np.float32)
    pol.observe_forecast(Forecast(layer=2, distance=1, scores=scores))
    assert pol.prefetch(0) == []  # a forecast for layer 2 is not acted on after layer 0 ...
    pol.observe_forecast(Forecast(layer=2, distance=1, scores=scores))
    loads = pol.prefetch(1)  # ... but after layer 1: chances 0.98, 0.6, 0.58 (0.1 and 0 fall under 0.5)
    assert [ld.key for ld in loads] == [(2, 0), (2, 2), (2, 5)]
    assert pol.prefetch(1) == []  # a forecast is used once


def test_a_forecast_needs_eager_execution_and_a_row_per_token() -> None:
    trace = random_trace()
    with pytest.raises(ValueError, match="eager execution"):
        simulate(trace, "lru-forecast", cache_size=8, forecast=one_hot(trace), execution="static")
    with pytest.raises(ValueError, match="one \\[L, E\\] row per trace row"):
        simulate(trace, "lru-forecast", cache_size=8, forecast=one_hot(trace)[:-1])
