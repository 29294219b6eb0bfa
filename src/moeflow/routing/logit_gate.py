"""The logit gate: layer ``j``'s router logits guessed ``d`` layers early by one ridge map per (layer, distance)
that predicts the logits directly, from what the engine holds once layer ``j - d`` has routed. The residual gate
(``routing.speculative``) carries the residual forward and applies layer ``j``'s router to it; its logits are
one block of features here, next to:

- the residual entering layer ``j - d`` (the embedding for ``j - d = -1``) as it is and scaled to unit RMS;
- layer ``j - d``'s own routing: its top-k softmax weights (zero off the top-k) and their products with the
  unit residual projected on its ``rank`` leading directions (what the experts about to run will add, as far as
  a linear map of the choice can say);
- the request's previous token: its residual at layer ``j - d``, and at layer ``j`` where that token's step
  finished before this one (decode), else at ``j - d`` again (prefill, where it runs beside this token).

The strength of each map is chosen per (layer, distance) by request-wise cross-validation on the fitting record;
the out-of-fold logits come back too, so the hybrid's weights are chosen on scores the gate did not see.
On the device this is a few small matmuls per layer: [H + 1, H], [E, H], [H, r] and one [F + 1, E] with
F = 4H + (2 + r)E (4H + E for the embedding as source).
Legend: N tokens, n tokens of a batch, L MoE layers, E experts, H hidden width, r rank, F features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.routing.hidden import HiddenRecord
from moeflow.routing.hybrid import recall_at_k
from moeflow.routing.ridge import apply_map, ridge_maps
from moeflow.routing.speculative import SpeculativeGate, first_layer, fit_gate
from moeflow.routing.trace import Trace

STRENGTHS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass(frozen=True)
class GateInputs:
    """What the engine holds for a batch of tokens once layer ``j - d`` has routed, each [n, H] float32."""

    source: np.ndarray
    """the residual entering MoE layer ``j - d`` (the token's embedding for ``j - d = -1``)"""
    prev_source: np.ndarray
    """the request's previous token's residual there (zeros for a request's first token)"""
    prev_target: np.ndarray
    """the previous token's residual entering layer ``j`` where its step finished before this token's, else
    ``prev_source``"""


def token_context(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Per trace row: the row of the request's previous position (-1: none) and whether that token's step came
    before this one's (its residuals at every layer are then known)."""
    order = np.lexsort((trace.position, trace.request))
    prev = np.full(trace.num_tokens, -1)
    same = trace.request[order[1:]] == trace.request[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    known = (prev >= 0) & (trace.step[np.maximum(prev, 0)] < trace.step)
    return prev, known


def record_inputs(
    rec: HiddenRecord, context: tuple[np.ndarray, np.ndarray], layer: int, distance: int
) -> GateInputs:
    """``GateInputs`` of every row of ``rec`` for guessing ``layer`` ``distance`` layers early."""
    prev, known = context
    src = rec.source(slice(None), layer - distance)
    has = (prev >= 0)[:, None]
    p_src = np.where(has, src[np.maximum(prev, 0)], 0.0).astype(np.float32)
    p_tgt = rec.residual[np.maximum(prev, 0), layer].astype(np.float32)
    return GateInputs(src, p_src, np.where(known[:, None], p_tgt, p_src))


def _unit(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def topk_weights(logits: np.ndarray, k: int) -> np.ndarray:
    """[n, E] softmax of ``logits`` on each row's top ``k``, zero elsewhere."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits >= kth, p, 0.0).astype(np.float32)


@dataclass(frozen=True)
class GateFeatures:
    """The feature blocks (module docstring) from a residual gate and per-layer projection bases."""

    base: SpeculativeGate
    basis: np.ndarray  # [L, H, r]: leading directions of each layer's unit residual
    top_k: int

    def __call__(self, inp: GateInputs, layer: int, distance: int) -> np.ndarray:
        """[n, F] features for guessing ``layer`` from layer ``layer - distance``."""
        src, eps = layer - distance, self.base.norm_eps
        unit = _unit(inp.source, eps)
        parts = [
            inp.source,
            unit,
            inp.prev_source,
            inp.prev_target,
            self.base.logits(inp.source, layer, distance),
        ]
        if src >= 0:
            q = topk_weights((unit * self.base.norm_weight[src]) @ self.base.gate_weight[src].T, self.top_k)
            low = unit @ self.basis[src]  # [n, r]
            parts += [q, (q[:, :, None] * low[:, None, :]).reshape(len(unit), -1)]
        return np.hstack(parts).astype(np.float32)


def fit_features(rec: HiddenRecord, rows: np.ndarray, distances: Sequence[int], rank: int) -> GateFeatures:
    """``GateFeatures`` fitted on the rows ``rows`` (bool [N]) of ``rec`` only."""
    base = fit_gate(rec, distances, rows=rows)
    hid = rec.residual.shape[2]
    basis = np.zeros((rec.residual.shape[1], hid, rank), np.float32)
    for s in range(rec.residual.shape[1]):
        u = _unit(rec.residual[rows, s].astype(np.float32), rec.norm_eps)
        vt = np.linalg.svd(u - u.mean(0), full_matrices=False)[2][:rank]
        basis[s, :, : len(vt)] = vt.T
    return GateFeatures(base, basis, rec.trace.top_k)


@dataclass(frozen=True)
class LogitGate:
    features: GateFeatures
    maps: dict[int, list[np.ndarray | None]]
    """distance d → per layer a [F + 1, E] map from features to logits (None: no source that far back)"""
    strengths: dict[int, list[float | None]]
    """the ridge strength chosen for each (distance, layer)"""

    @property
    def distances(self) -> tuple[int, ...]:
        return tuple(self.maps)

    def logits(self, inp: GateInputs, layer: int, distance: int) -> np.ndarray:
        """[n, E] guessed router logits of ``layer``."""
        m = self.maps[distance][layer]
        if m is None:
            raise ValueError(f"layer {layer} has no source {distance} layers before it")
        return apply_map(self.features(inp, layer, distance), m)

    def record_logits(self, rec: HiddenRecord, distance: int) -> np.ndarray:
        """[N, L, E] guessed logits of every row of ``rec`` (NaN for layers with no source)."""
        t, ctx = rec.trace, token_context(rec.trace)
        out = np.full((t.num_tokens, t.num_layers, t.num_experts), np.nan, np.float32)
        for j in range(first_layer(distance), t.num_layers):
            out[:, j] = self.logits(record_inputs(rec, ctx, j, distance), j, distance)
        return out


def fit_logit_gate(
    rec: HiddenRecord, distances: Sequence[int] = (1, 2, 4), strengths: Sequence[float] = STRENGTHS,
    rank: int = 8, folds: int = 2,
) -> tuple[LogitGate, dict[int, np.ndarray]]:  # fmt: skip
    """The gate fitted on every row of ``rec``, each (layer, distance)'s strength the one with the best recall@k
    over ``folds`` request-wise folds (request ``i`` in order of appearance goes to fold ``i % folds``), and per
    distance the out-of-fold logits [N, L, E] at that strength (NaN where no source). With fewer than two
    requests nothing can be held out: the middle strength is used and the logits are in-sample."""
    t = rec.trace
    reqs = t.requests()
    folds = min(folds, len(reqs))
    fold = np.asarray([reqs.index(int(r)) % max(folds, 1) for r in t.request]) if folds >= 2 else np.zeros(0)
    ctx = token_context(t)
    everything = np.ones(t.num_tokens, bool)
    per_fold = [fit_features(rec, fold != f, distances, rank) for f in range(folds)] if folds >= 2 else []
    full = fit_features(rec, everything, distances, rank)
    cands = tuple(strengths) if per_fold else (strengths[len(strengths) // 2],)
    maps: dict[int, list[np.ndarray | None]] = {}
    chosen: dict[int, list[float | None]] = {}
    oof: dict[int, np.ndarray] = {}
    for d in distances:
        maps[d], chosen[d] = [None] * t.num_layers, [None] * t.num_layers
        oof[d] = np.full((t.num_tokens, t.num_layers, t.num_experts), np.nan, np.float32)
        for j in range(first_layer(d), t.num_layers):
            inp, target = record_inputs(rec, ctx, j, d), rec.gate_logits(j)
            x_full = full(inp, j, d)
            if per_fold:
                pred = np.empty((len(cands), *target.shape), np.float32)
                for f, feats in enumerate(per_fold):
                    x, tr = feats(inp, j, d), fold != f
                    for i, m in enumerate(ridge_maps(x[tr], target[tr], cands)):
                        pred[i, ~tr] = apply_map(x[~tr], m)
                ok = (t.experts[:, j] >= 0).all(-1)
                best = int(np.argmax([recall_at_k(p[ok], t.experts[ok, j], t.top_k) for p in pred]))
            else:
                best = 0
            maps[d][j] = ridge_maps(x_full, target, [cands[best]])[0]
            chosen[d][j] = float(cands[best])
            oof[d][:, j] = pred[best] if per_fold else apply_map(x_full, maps[d][j])
    return LogitGate(full, maps, chosen), oof
