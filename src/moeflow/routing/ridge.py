"""Ridge regression of many targets at once, for several strengths from one eigendecomposition: what the logit
gate (``routing.logit_gate``) fits its per-(layer, distance) maps with.

Features are standardised on the fitting rows (so one strength means the same for every feature) and the targets
centred (so the bias is not shrunk); the returned maps are folded back to act on the raw features, as one
``[F + 1, T]`` matrix whose last row is the bias. Strengths are per row: the penalty is ``strength × n × I``.
Legend: n rows, F features, T targets, S strengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ridge_maps(x: np.ndarray, y: np.ndarray, strengths: Sequence[float]) -> list[np.ndarray]:
    """One ``[F + 1, T]`` float32 map (last row: bias) per strength, fitted on ``x`` [n, F] → ``y`` [n, T]."""
    n = len(x)
    mean = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64)
    scale[scale < 1e-8] = 1.0  # constant features: left as they are (their weight comes out 0)
    xs = (x - mean) / scale
    ym = y.mean(0, dtype=np.float64)
    eig, vec = np.linalg.eigh(xs.T @ xs)
    proj = vec.T @ (xs.T @ (y - ym))  # [F, T]
    out = []
    for s in strengths:
        w = vec @ (proj / (np.maximum(eig, 0.0) + s * n)[:, None]) / scale[:, None]  # [F, T], raw features
        out.append(np.vstack([w, ym - mean @ w]).astype(np.float32))
    return out


def apply_map(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x`` [n, F] through a ``[F + 1, T]`` map → [n, T]."""
    return x @ m[:-1] + m[-1]
