"""Ridge maps: a known linear map and bias come back, stronger penalties shrink, constant features are harmless."""

from __future__ import annotations

import numpy as np

from moeflow.routing.ridge import apply_map, ridge_maps


def test_recovers_a_known_map_and_bias_on_raw_features() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0  # unequal scales, offset
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    y = x @ w + b + 1e-3 * rng.normal(size=(500, 3))
    (m,) = ridge_maps(x, y, [1e-9])
    assert m.shape == (6, 3)
    assert np.allclose(m[:-1], w, atol=2e-2) and np.allclose(m[-1], b, atol=0.2)
    assert np.abs(apply_map(x, m) - y).max() < 0.02


def test_stronger_penalties_shrink_the_map_and_leave_the_mean() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    y = x @ rng.normal(size=(8, 2)) + 5.0
    maps = ridge_maps(x, y, [1e-4, 1e-1, 1e2])
    norms = [np.linalg.norm(m[:-1]) for m in maps]
    assert norms[0] > norms[1] > norms[2]
    assert np.allclose(apply_map(x, maps[2]).mean(0), y.mean(0), atol=1e-3)  # the bias is not shrunk


def test_a_constant_feature_gets_no_weight() -> None:
    rng = np.random.default_rng(2)
    x = np.hstack([rng.normal(size=(100, 3)), np.ones((100, 1))])
    (m,) = ridge_maps(x, x[:, :3].sum(1, keepdims=True), [1e-6])
    assert np.isfinite(m).all() and abs(m[3, 0]) < 1e-6 and np.allclose(m[:3, 0], 1.0, atol=1e-3)
