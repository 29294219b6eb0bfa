"""Speculative gating (mixtral-offloading's speculative loading, ProMoE): the experts of MoE layer ``j`` guessed
``d`` layers early, by applying layer ``j``'s own router (its RMSNorm, then its gate) to the residual stream as it
stands at layer ``j - d``. A linear map per (layer, distance), fitted by ridge regression on recorded residuals,
first carries the residual of layer ``j - d`` to where it is expected at layer ``j``; without it (``fit=False``)
the raw residual is used. On the device this is a few small matmuls per layer inside the step.

Legend: n tokens, L MoE layers, E experts, H hidden width, d distance in layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeflow.routing.hidden import HiddenRecord


@dataclass(frozen=True)
class SpeculativeGate:
    distances: tuple[int, ...]
    maps: dict[int, np.ndarray]
    """distance d → [L, H + 1, H] float32: row-vector map (last row: bias) from the residual at layer j - d to
    the one at layer j (j - d = -1: the token's embedding; identity for layers j < d - 1, which have no source)."""
    norm_weight: np.ndarray  # [L, H]
    norm_eps: float
    gate_weight: np.ndarray  # [L, E, H]

    def logits(self, residual: np.ndarray, layer: int, distance: int) -> np.ndarray:
        """[n, E] router logits of ``layer`` guessed from ``residual`` [n, H] of layer ``layer - distance``."""
        a = self.maps[distance][layer]
        r = residual.astype(np.float32) @ a[:-1] + a[-1]
        r = r / np.sqrt((r * r).mean(axis=-1, keepdims=True) + self.norm_eps) * self.norm_weight[layer]
        return r @ self.gate_weight[layer].T

    def probs(self, residual: np.ndarray, layer: int, distance: int) -> np.ndarray:
        """[n, E] softmax of ``logits``."""
        z = self.logits(residual, layer, distance)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


def first_layer(distance: int) -> int:
    """The first layer with a source ``distance`` layers before it (the embedding counts as layer -1)."""
    return distance - 1


def fit_gate(
    rec: HiddenRecord,
    distances: Sequence[int] = (1, 2, 4),
    ridge: float = 1.0,
    fit: bool = True,
    rows: np.ndarray | None = None,
) -> SpeculativeGate:
    """Fit the residual maps on ``rec`` (every recorded token, or the ``rows`` where a bool mask is True);
    ``fit=False``: identity maps (raw residuals)."""
    sel = slice(None) if rows is None else np.flatnonzero(rows)
    num_layers, hid = rec.residual.shape[1:]
    n = rec.residual.shape[0] if rows is None else int(np.count_nonzero(rows))
    eye = np.vstack([np.eye(hid, dtype=np.float32), np.zeros((1, hid), np.float32)])  # [H + 1, H]
    maps = {}
    for d in distances:
        m = np.broadcast_to(eye, (num_layers, hid + 1, hid)).copy()
        for j in range(d - 1, num_layers) if fit else ():
            x = np.hstack([rec.source(sel, j - d).astype(np.float64), np.ones((n, 1))])  # [n, H + 1]
            y = rec.residual[sel, j].astype(np.float64)
            reg = ridge * np.eye(hid + 1)
            reg[-1, -1] = 0.0  # the bias is not shrunk
            m[j] = np.linalg.solve(x.T @ x + reg, x.T @ y).astype(np.float32)
        maps[d] = m
    return SpeculativeGate(tuple(distances), maps, rec.norm_weight, rec.norm_eps, rec.gate_weight)
