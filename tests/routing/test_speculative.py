"""Speculative gating and the hybrid: fitted residual maps recover a linear drift between layers; the hybrid's
weights follow whichever component is accurate at each layer."""

from __future__ import annotations

import numpy as np

from moeflow.routing.hidden import HiddenRecord
from moeflow.routing.hybrid import Components, fit_hybrid, recall_at_k, weight_grid
from moeflow.routing.speculative import fit_gate
from moeflow.routing.trace import Trace

N, L, E, K, H = 400, 4, 8, 2, 6


def drifting_record(seed: int = 0) -> HiddenRecord:
    """Residuals that rotate by a fixed random map from layer to layer; routing = each layer's own router."""
    rng = np.random.default_rng(seed)
    drift = rng.normal(size=(H, H)) / np.sqrt(H)
    res = np.zeros((N, L, H), np.float32)
    embed = rng.normal(size=(N, H)).astype(np.float32)
    res[:, 0] = embed @ drift
    for j in range(1, L):
        res[:, j] = res[:, j - 1] @ drift
    gates = rng.normal(size=(L, E, H)).astype(np.float32)
    rec = HiddenRecord(None, res, embed, np.ones((L, H), np.float32), 1e-6, gates)  # type: ignore[arg-type]
    experts = np.stack([np.argsort(-rec.gate_logits(j), axis=1)[:, :K] for j in range(L)], axis=1)
    trace = Trace("drift", E, K, np.arange(N) // 10, np.arange(N) % 10, np.ones(N, bool), np.arange(N),
                  np.zeros(N, int), experts, np.ones(experts.shape, np.float32))  # fmt: skip
    return HiddenRecord(trace, res, embed, rec.norm_weight, rec.norm_eps, gates)


def test_fitted_maps_recover_the_drift_the_raw_residual_misses() -> None:
    rec = drifting_record()
    fitted, raw = fit_gate(rec, (1, 2), ridge=1e-6), fit_gate(rec, (1, 2), fit=False)
    for d in (1, 2):
        for j in range(d - 1, L):
            truth = rec.trace.experts[:, j]
            src = rec.source(slice(None), j - d)
            assert recall_at_k(fitted.logits(src, j, d), truth, K) > 0.99
        assert (
            recall_at_k(
                raw.logits(rec.source(slice(None), L - 1 - d), L - 1, d), rec.trace.experts[:, L - 1], K
            )
            < 0.9
        )


def test_recall_at_k_counts_shared_experts() -> None:
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.8, 0.9]])
    assert recall_at_k(scores, np.array([[0, 2], [2, 3]]), 2) == 0.75


def test_weight_grid_is_the_simplex() -> None:
    g = weight_grid(0.5)
    assert np.allclose(g.sum(1), 1) and len(g) == 6 and (weight_grid(0.5, gate=False)[:, 0] == 0).all()


def test_hybrid_leans_on_the_accurate_component_per_layer() -> None:
    rng = np.random.default_rng(0)
    n = 300
    truth = np.stack([np.argsort(rng.random((n, E)), axis=1)[:, :K] for _ in range(L)], axis=1)  # [n, L, K]
    hot = np.zeros((n, L, E), np.float32)
    np.put_along_axis(hot, truth, 1.0, axis=-1)
    noise = rng.random((n, L, E)).astype(np.float32)
    gate = noise.copy()
    gate[:, 2:] = hot[:, 2:]  # the gate knows layers 2 and 3
    path = noise.copy()
    path[:, :2] = hot[:, :2]  # the path predictor knows layers 0 and 1
    comp = Components({1: gate, 2: gate, 4: gate}, path, np.zeros_like(hot), np.zeros((L, E)))
    w = fit_hybrid([comp], [truth], [np.ones(n, bool)], K, step=0.25).weights["1"]
    assert (w[:2, 1] > w[:2, 0]).all() and (w[2:, 0] > w[2:, 1]).all()
