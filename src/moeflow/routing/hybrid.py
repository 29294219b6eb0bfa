"""The hybrid routing predictor: per MoE layer and look-ahead distance, a weighted mix of speculative gating (the
layer's own router on an earlier layer's residual, ``routing.speculative``; for the next few layers), ExpertFlow's
path predictor (before the step, from token ids; for layers far ahead) and the previous token's experts. The
weights of each (layer, distance) are the ones with the best measured recall on training-split tokens
(``fit_hybrid``), so each layer leans on whichever source is accurate there.

Distances: ``LOOKAHEADS`` layers ahead (the guess for layer ``j`` is made once layer ``j - d`` has routed) and
``BEFORE`` (before the step: no residual of this token yet, so no gating).
Legend: n tokens of a request, L MoE layers, E experts, K top-k, C components (gate, path, last token).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

LOOKAHEADS = (1, 2, 4)
BEFORE = "before_step"
COMPONENTS = ("gate", "path", "last_token")


def distance_keys() -> list[int | str]:
    return [*LOOKAHEADS, BEFORE]


@dataclass(frozen=True)
class Components:
    """One request's component scores, each [n, L, E] (gate: per distance; NaN rows where it has no source)."""

    gate: dict[int, np.ndarray]
    path: np.ndarray
    last_token: np.ndarray
    popularity: np.ndarray  # [L, E]

    def stack(self, key: int | str) -> np.ndarray:
        """[C, n, L, E] scores of the components at distance ``key`` (gate zero where unavailable)."""
        gate = np.zeros_like(self.path) if key == BEFORE else np.nan_to_num(self.gate[int(key)], nan=0.0)
        return np.stack([gate, self.path, self.last_token])


@dataclass(frozen=True)
class HybridWeights:
    weights: dict[str, np.ndarray]
    """str(distance) → [L, C] weights of (gate, path, last token) per layer."""

    def score(self, comp: Components, key: int | str) -> np.ndarray:
        """[n, L, E] hybrid scores at distance ``key``."""
        w = self.weights[str(key)]  # [L, C]
        return np.einsum("cnle,lc->nle", comp.stack(key), w) + 1e-3 * comp.popularity[None]

    def to_dict(self) -> dict[str, list]:
        return {k: np.round(v, 3).tolist() for k, v in self.weights.items()}


def weight_grid(step: float = 0.1, gate: bool = True) -> np.ndarray:
    """[G, C] weights on the simplex in steps of ``step`` (gate weight 0 when ``gate`` is False)."""
    n = round(1 / step)
    pts = [(a, b, n - a - b) for a, b in itertools.product(range(n + 1), repeat=2) if a + b <= n]
    grid = np.asarray(pts, np.float64) / n
    return grid if gate else grid[grid[:, 0] == 0]


def fit_hybrid(
    comps: list[Components], experts: list[np.ndarray], valid: list[np.ndarray], top_k: int, step: float = 0.1
) -> HybridWeights:
    """Per (distance, layer) the grid weights with the best per-token recall@k on ``comps`` (training requests;
    ``experts`` [n, L, K] their true routing, ``valid`` [n] tokens to count). A layer with no gate source at a
    distance (layer < distance - 1) searches only path and last-token weights."""
    num_layers = experts[0].shape[1]
    out = {}
    for key in distance_keys():
        stacks = np.concatenate([c.stack(key)[:, v] for c, v in zip(comps, valid)], axis=1)  # [C, N, L, E]
        pop = comps[0].popularity
        truth = np.concatenate([e[v] for e, v in zip(experts, valid)])  # [N, L, K]
        w = np.zeros((num_layers, len(COMPONENTS)))
        for layer in range(num_layers):
            has_gate = key != BEFORE and layer >= int(key) - 1
            best = -1.0
            for cand in weight_grid(step, has_gate):
                s = np.einsum("cne,c->ne", stacks[:, :, layer], cand) + 1e-3 * pop[layer]
                r = recall_at_k(s, truth[:, layer], top_k)
                if r > best + 1e-12:
                    best, w[layer] = r, cand
        out[str(key)] = w
    return HybridWeights(out)


def recall_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean per-token share of the true experts ``truth`` [n, K] among the ``k`` top-scored of ``scores`` [n, E]."""
    top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    return float((top[:, :, None] == truth[:, None, :]).any(-1).sum(-1).mean() / k)
