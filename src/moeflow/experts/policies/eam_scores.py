"""MoE-Infinity's predicted activation ratios of a step, kept incrementally through its layers.

Each running request's blend [L, E] is, row by row, its own ratios mixed with its match's (weight ``history_weight``
on its own, on rows it has routed), the match's alone (rows it has not), or its own alone (no match); the step's
ratios are the requests' blends summed in step order, and, when predictions come from the match alone, the
matches summed likewise (``MoEInfinityPolicy._update_scores``). Between two layers of a step a request's own
ratios change in the new layer's row only, and its match changes only when its best entry does, so a layer
recomputes that row of every blend, the whole blend of a request whose match changed, and the sums over the
requests of the rows that changed. Every value is the full computation's, bit for bit: the same elementwise
arithmetic, and the sums over requests in step order (``add.reduce`` over the outer axis adds row after row).
Pure NumPy. Legend: B requests of the step, L layers, E experts.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

UNMATCHED = -1
"""The key of a request without a match (its blend is its own ratios)."""


class BlendedRatios:
    """The step's blends, their sum over the requests (``ratio``) and the matches' sum (``match``)."""

    def __init__(self) -> None:
        self.ratio: np.ndarray | None = None  # [L, E]
        self.match: np.ndarray | None = None  # [L, E] Σ of the matched requests' predictions (when tracked)
        self._blend: np.ndarray | None = None  # [B, L, E]
        self._keys: list[Hashable] = []
        self._scaled: dict[Hashable, np.ndarray] = {}  # (1 − history_weight) × a keyed prediction
        self._stale = True

    def invalidate(self) -> None:
        """Every request's own ratios (or the set of requests, or the collection) changed: recompute all."""
        self._stale = True
        self._scaled = {}

    def update(
        self,
        own: np.ndarray,
        seen: np.ndarray,
        preds: Sequence[np.ndarray | None],
        keys: Sequence[Hashable],
        layer: int,
        history_weight: float,
        track_match: bool,
    ) -> None:
        """The blends after ``layer`` routed (``own`` [B, L, E] and ``seen`` [B, L, 1] changed in that row only, unless
        invalidated). ``preds[i]``: request ``i``'s match [L, E] (None: unmatched), identified by ``keys[i]`` (equal
        keys: the same prediction as last time; None: not known to be)."""
        n, hw = len(preds), history_weight
        full = self._stale or self._blend is None or self._blend.shape != own.shape
        if full:
            self._blend = np.empty_like(own)
        assert self._blend is not None
        changed = [i for i in range(n) if full or keys[i] is None or keys[i] != self._keys[i]]
        for i in changed:
            self._blend[i] = self._blend_of(own[i], seen[i], preds[i], keys[i], hw)
        if changed and track_match:
            self.match = np.zeros(own.shape[1:])
            for p in preds:  # in step order, as one running sum
                if p is not None:
                    self.match += p
        if layer >= 0 and len(changed) < n:
            self._update_row(own, seen, preds, keys, layer, hw, set(changed))
        if changed or self.ratio is None:
            self.ratio = np.add.reduce(self._blend, axis=0) if n else np.zeros(own.shape[1:])
        elif layer >= 0:
            self.ratio[layer] = np.add.reduce(self._blend[:, layer], axis=0)
        if track_match and self.match is None:
            self.match = np.zeros(own.shape[1:])
        self._keys, self._stale = list(keys), False

    def _scaled_pred(self, pred: np.ndarray, key: Hashable, hw: float) -> np.ndarray:
        """(1 − hw) × ``pred``, cached per key."""
        if key is None:
            return (1 - hw) * pred
        out = self._scaled.get(key)
        if out is None:
            if len(self._scaled) >= 256:
                del self._scaled[next(iter(self._scaled))]
            out = self._scaled[key] = (1 - hw) * pred
        return out

    def _blend_of(
        self, own: np.ndarray, seen: np.ndarray, pred: np.ndarray | None, key: Hashable, hw: float
    ) -> np.ndarray:
        """One request's blend [L, E] (``own`` [L, E], ``seen`` [L, 1])."""
        if pred is None:
            return own
        mixed = hw * own + self._scaled_pred(pred, key, hw)
        return mixed if seen.all() else np.where(seen, mixed, pred)

    def _update_row(
        self,
        own: np.ndarray,
        seen: np.ndarray,
        preds: Sequence[np.ndarray | None],
        keys: Sequence[Hashable],
        layer: int,
        hw: float,
        changed: set[int],
    ) -> None:
        """Row ``layer`` of the blends of the requests not in ``changed`` (the same arithmetic as ``_blend_of``)."""
        assert self._blend is not None
        same = [i for i in range(len(preds)) if i not in changed]
        mine = [i for i in same if preds[i] is None]
        if mine:
            self._blend[mine, layer] = own[mine, layer]
        matched = [i for i in same if preds[i] is not None]
        if matched:
            scaled = np.stack([self._scaled_pred(preds[i], keys[i], hw)[layer] for i in matched])  # type: ignore[arg-type]
            mixed = hw * own[matched, layer] + scaled  # [M, E]
            routed = seen[matched, layer]  # [M, 1]
            if not routed.all():
                mixed = np.where(routed, mixed, np.stack([preds[i][layer] for i in matched]))  # type: ignore[index]
            self._blend[matched, layer] = mixed


def use_probability(ratio: np.ndarray, top_k: int, calib: float) -> np.ndarray:
    """Calibrated chance [L, E] that each expert is requested in the step: ``1 − exp(−calib · K · ratio)`` (``ratio``:
    the step's requests' predicted activation ratios, summed; ``K · ratio`` is the expected selections per token).
    ``calib`` was fitted by maximum likelihood on training routing (BENCHMARKS.md, issue 15)."""
    return -np.expm1(-calib * top_k * ratio)


def expected_gap(p_use: np.ndarray, num_layers: int) -> np.ndarray:
    """[L, E] expected layers, beyond its next turn, until each expert is next requested: each later turn (one per
    step) is a geometric trial with chance ``p_use``, so ``L · (1 − p) / p`` (p floored at 1e-9)."""
    p = np.maximum(p_use, 1e-9)
    return num_layers * (1 - p) / p


def distance_keep(gap: np.ndarray, layer: int) -> np.ndarray:
    """Keep-scores [L, E] after ``layer`` routed (−1: before the step): ``1 / (1 + d)``, where ``d`` = the layers
    until the expert's layer comes round again (``j − layer − 1`` for a layer ahead in this step, one step on for the
    others) + ``gap``: the expected distance to its next use, farthest evicted first (Belady's rule on expectations)."""
    num_layers = gap.shape[0]
    turn = (np.arange(num_layers) - layer - 1) % num_layers  # [L]
    return 1.0 / (1.0 + turn[:, None] + gap)


class CalibratedChances:
    """``variant=calibrated``'s chances of use [L, E] and expected distances to next use, kept through a step: between
    its layers only row ``layer`` of the ratios changes (the matches are the step's, made at its start)."""

    def __init__(self) -> None:
        self.p_use: np.ndarray | None = None  # [L, E]
        self.gap: np.ndarray | None = None  # [L, E]

    def reset(self) -> None:
        """Every row may have changed (a new step, or a settled one)."""
        self.p_use = self.gap = None

    def update(self, ratio: np.ndarray, layer: int, top_k: int, calib: float) -> np.ndarray:
        """The keep-scores [L, E] after ``layer`` routed, from the step's ratios ``ratio`` [L, E]."""
        num_layers = ratio.shape[0]
        if self.p_use is None or self.gap is None or layer < 0:
            self.p_use = use_probability(ratio, top_k, calib)
            self.gap = expected_gap(self.p_use, num_layers)
        else:
            self.p_use[layer] = use_probability(ratio[layer], top_k, calib)
            self.gap[layer] = expected_gap(self.p_use[layer], num_layers)
        return distance_keep(self.gap, layer)
