"""Matching running requests against an EAM collection (``routing.eam``), layer by layer through a decode step: each
request's EAM with its cached per-row dot products (``RequestEAM``), the similarities of a step's requests at once
(``match``) and their predictions (``predict_batch``).

A request's similarity over rows ``0..l`` is a sum of per-row dot products (entry row · normalised query row), so
only the rows routed since the last match are recomputed: at layer ``l`` of a decode step, row ``l`` of every
request (normalised together, one matrix-vector product each), written into each request's layer-major [L, N]
store (one contiguous row per layer); the running sum over rows then grows by that row. Every value is the
one-request-at-a-time computation's, bit for bit (the same products, the same reductions over contiguous rows,
the best entry's rows as they are), so no decision changes (``tests/experts/policies/test_eam_decisions.py``).
One [B, E] × [E, N] product for the step would round differently and measured no faster here (8 requests, 1000
entries, cache-cold: a layer's N × E entries come from beyond the L2 cache either way).
Legend: B requests, L layers, E experts, N collection entries, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeflow.routing.eam import EAMCollection, cosine, row_normalise


class RequestEAM:
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

    def add(self, layer: int, experts: np.ndarray) -> None:
        """Count the routing ``experts`` [T, K] of ``layer`` (ids < 0 ignored)."""
        ids = experts[experts >= 0].astype(np.int64)
        np.add.at(self.counts[layer], ids, 1.0)
        self._dirty.add(layer)

    def add_counts(self, layer: int, counts: np.ndarray) -> None:
        """Add ``counts`` [E] (integer-valued: the same sums as ``add`` of the routing they count) to ``layer``."""
        self.counts[layer] += counts
        self._dirty.add(layer)

    def similarity(self, eamc: EAMCollection, upto: int) -> np.ndarray:
        """Cosine similarity [N] to each entry over rows 0..upto (as ``eamc.similarity``, cached)."""
        return match([self], eamc, upto)[0]

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


def match(requests: Sequence[RequestEAM], eamc: EAMCollection, upto: int) -> np.ndarray:
    """Cosine similarities [B, N] of each of ``requests`` to every entry over rows 0..upto (row ``i``:
    ``requests[i].similarity(eamc, upto)``); the rows routed since each request's last match are refreshed."""
    for req in requests:
        req._catch_up(eamc)
    # one more row onto the last sum when only that row changed (layer by layer through a step)
    extends = [r._sum is not None and r._upto == upto - 1 and r._dirty <= {upto} for r in requests]
    by_row: dict[int, list[RequestEAM]] = {}
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


def predict_batch(eamc: EAMCollection, sims: np.ndarray, k: int = 1) -> np.ndarray:
    """Predicted activation ratios [B, L, E], row ``i`` ``eamc.predict(sims[i], k)`` ([B, N] similarities; the
    collection must not be empty). With ``k`` = 1 the best entry's normalised rows: the argmax where it is the only
    best, else ``nearest``'s choice among the tied (its selection, not the first index)."""
    if k != 1:
        return np.stack([eamc.predict(s, k) for s in sims])  # type: ignore[misc]
    best = sims.argmax(axis=1)  # [B]
    tied = (sims == sims[np.arange(len(sims)), best][:, None]).sum(axis=1) > 1
    for i in np.flatnonzero(tied).tolist():
        best[i] = eamc.nearest(sims[i], 1)[0]
    return eamc.unit_by_layer[:, best].transpose(1, 0, 2)
