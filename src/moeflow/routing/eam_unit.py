"""Matching running requests against an EAM collection by per-request products of normalised rows: the matcher
MoE-Infinity used before the canonical form of ``routing.eam_index``, kept for predictions that average several
matches (``match_k`` > 1), where the similarities' values — and which of several entries whose similarities are
mathematically equal makes the cut — reach the decisions: those ties are broken by the rounding of these very
products (NumPy's matrix-vector products), so only the same products keep the decisions recorded with them.

At layer ``l`` of a decode step, row ``l`` of every request is normalised and multiplied with the collection's
layer-major normalised rows (one matrix-vector product each, N × E), written into each request's layer-major
[L, N] store; the running sum over rows then grows by that row. An admission refreshes one entry per request.
Legend: B requests, L layers, E experts, N collection entries, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeflow.routing.eam import EAMCollection, cosine, row_normalise
from moeflow.routing.eam_match import CountRows


class UnitRequestEAM(CountRows):
    """The EAM of one running request, with per-row dot products against a collection cached so that matching at
    layer ``l`` costs O(N·E) (only row ``l`` changed since the previous layer), and an admission into the collection
    costs O(L·E) per changed entry (``EAMCollection.changed_since``)."""

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts), np.float64)  # [L, E]
        self._dots: np.ndarray | None = None  # [L, N] entry row · normalised query row, layer-major
        self._q = np.zeros((num_layers, num_experts))  # [L, E] normalised query rows (as of the last update)
        self._q_sq = np.zeros(num_layers)  # [L] squared norm of each normalised query row
        self._version = -1
        self._dirty: set[int] = set()
        self._sum: np.ndarray | None = None  # [N] dots summed over rows 0.._upto
        self._upto = -1

    def similarity(self, eamc: EAMCollection, upto: int) -> np.ndarray:
        """Cosine similarity [N] to each entry over rows 0..upto (as ``eamc.similarity``, cached)."""
        return match_unit([self], eamc, upto)[0]

    def _catch_up(self, eamc: EAMCollection) -> None:
        """Recompute the dot products of the entries changed since the last match (all of them if unknown)."""
        if self._version == eamc.version:
            return
        changed = None if self._dots is None else eamc.changed_since(self._version)
        self._version, self._sum = eamc.version, None
        layers = self.counts.shape[0]
        if changed is None:
            self._dots = np.zeros((layers, len(eamc)))
            self._dirty = set(range(layers))
            return
        assert self._dots is not None
        if self._dots.shape[1] < len(eamc):
            grown = np.zeros((layers, len(eamc)))
            grown[:, : self._dots.shape[1]] = self._dots
            self._dots = grown
        clean = [r for r in range(layers) if r not in self._dirty]
        unit = eamc.unit_by_layer
        for idx in sorted(set(changed)):
            self._dots[clean, idx] = np.einsum("le,le->l", unit[clean, idx], self._q[clean])

    def _prefix(self, upto: int, extends: bool, out: np.ndarray) -> None:
        """``out`` [N] := dots summed over rows 0..upto: the last sum plus row ``upto`` when ``extends``, else summed
        afresh (over a contiguous copy, so that the reduction is the one over an entry's rows); kept as the last sum."""
        assert self._dots is not None
        if extends:
            assert self._sum is not None
            np.add(self._sum, self._dots[upto], out=out)
        else:
            np.ascontiguousarray(self._dots[: upto + 1].T).sum(axis=1, out=out)
        self._sum, self._upto = out, upto


def match_unit(requests: Sequence[UnitRequestEAM], eamc: EAMCollection, upto: int) -> np.ndarray:
    """Cosine similarities [B, N] of each of ``requests`` to every entry over rows 0..upto (row ``i``:
    ``requests[i].similarity(eamc, upto)``); the rows routed since each request's last match are refreshed."""
    for req in requests:
        req._catch_up(eamc)
    # one more row onto the last sum when only that row changed (layer by layer through a step)
    extends = [r._sum is not None and r._upto == upto - 1 and r._dirty <= {upto} for r in requests]
    by_row: dict[int, list[UnitRequestEAM]] = {}
    for req in requests:
        for row in req._dirty:
            by_row.setdefault(row, []).append(req)
        req._dirty = set()
    unit = eamc.unit_by_layer  # [L, N, E]
    for row, group in by_row.items():
        q = row_normalise(np.stack([r.counts[row] for r in group]))  # [G, E]
        q_sq = (q**2).sum(axis=1)  # [G]
        for i, req in enumerate(group):
            req._q[row], req._q_sq[row] = q[i], q_sq[i]
            np.matmul(unit[row], q[i], out=req._dots[row])  # type: ignore[index]
    sums = np.empty(
        (len(requests), len(eamc))
    )  # [B, N]; row i stays request i's last sum (never written again)
    for i, (req, ext) in enumerate(zip(requests, extends)):
        req._prefix(upto, ext, sums[i])
    q_sq = np.stack([r._q_sq for r in requests])[:, : upto + 1].sum(axis=1, keepdims=True)  # [B, 1]
    return cosine(sums, q_sq, eamc.cum_sq_by_layer[upto])
