"""Matching running requests against an EAM collection (``routing.eam``), layer by layer through a decode step: each
request's EAM with its cached per-row products (``RequestEAM``), the similarities of a step's requests at once
(``match``) and their predictions (``predict_batch``).

A request's similarity over rows ``0..l`` is built from per-row integer products with the entries' counts
(``raw``; the canonical form of ``routing.eam_index``), so a match touches only what changed since the last one: at
layer ``l`` of a decode step, row ``l`` of each request gained one token's K experts, and its ``raw`` row grows by
those experts' entry counts (one product over the step's requests and the experts any of them routed: a few of the
E rows of the collection's expert-major counts, not all of them); the row's dot products follow with one division,
and the running sums over rows grow by that row. For integer counts every value is exact up to the canonical
divisions and sums, so a request gets the same bits alone or batched, grown token by token or counted at once
(``tests/routing/test_eam_match.py``). An admission changes one entry: each request recomputes that entry's column.
Legend: B requests, L layers, E experts, N collection entries, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeflow.routing.eam import EAMCollection
from moeflow.routing.eam_index import row_sq, sequential_sum


class CountRows:
    """A request's expert counts per layer (``counts`` [L, E]) and the rows changed since its last match
    (``_dirty``): what both matchers (this module's and ``eam_unit.py``'s) keep the same way."""

    counts: np.ndarray
    _dirty: set[int]

    def add(self, layer: int, experts: np.ndarray) -> None:
        """Count the routing ``experts`` [T, K] of ``layer`` (ids < 0 ignored)."""
        ids = experts[experts >= 0].astype(np.int64)
        np.add.at(self.counts[layer], ids, 1.0)
        self._dirty.add(layer)

    def changed(self, layer: int) -> None:
        """Row ``layer`` of ``counts`` was changed in place (by whoever holds them, e.g. as a view)."""
        self._dirty.add(layer)

    def add_counts(self, layer: int, counts: np.ndarray) -> None:
        """Add ``counts`` [E] (integer-valued: the same sums as ``add`` of the routing they count) to ``layer``."""
        self.counts[layer] += counts
        self._dirty.add(layer)


class RequestEAM(CountRows):
    """The EAM of one running request, with its per-row integer products against a collection cached so that
    matching at layer ``l`` reads only the entry counts of the experts row ``l`` gained since the previous match,
    and an admission into the collection costs O(L·E) per changed entry (``EAMCollection.changed_since``)."""

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts), np.float64)  # [L, E]
        self._synced = np.zeros((num_layers, num_experts))  # [L, E] the counts ``_raw`` reflects
        self._raw: np.ndarray | None = None  # [L, >=N] Σ_e counts · entry counts per row (as of ``_synced``)
        self._sums = np.zeros(num_layers)  # [L] row sums of ``_synced``
        self._q_sq = np.zeros(num_layers)  # [L] squared norms of its normalised rows
        self._version = -1
        self._dirty: set[int] = set()
        self._dot: np.ndarray | None = None  # [N] dot products summed over rows 0.._upto
        self._q = 0.0  # squared norms summed over rows 0.._upto
        self._upto = -1
        self._dirty_rows: set[int] = set()  # rows refreshed by the match in progress

    def similarity(self, eamc: EAMCollection, upto: int) -> np.ndarray:
        """Cosine similarity [N] to each entry over rows 0..upto (as ``eamc.similarity``, cached)."""
        return match([self], eamc, upto)[0]

    def _catch_up(self, eamc: EAMCollection) -> None:
        """Recompute the products of the entries changed since the last match (all of them if unknown), from the
        counts they reflect; the sums over rows start afresh."""
        if self._version == eamc.version:
            return
        index, n = eamc.index, len(eamc)
        changed = None if self._raw is None else eamc.changed_since(self._version)
        self._version, self._dot, self._upto = eamc.version, None, -1
        if self._raw is None or self._raw.shape[1] < index.capacity:
            grown = np.zeros((self.counts.shape[0], index.capacity))
            if self._raw is not None:
                grown[:, : self._raw.shape[1]] = self._raw
            self._raw = grown
        if not self._synced.any():  # nothing reflected yet (a new request): every product is 0
            return
        if changed is None:
            self._raw[:, :n] = index.raw_columns(self._synced, np.arange(n))
        elif changed:
            idx = np.array(sorted(set(changed)), np.int64)
            self._raw[:, idx] = index.raw_columns(self._synced, idx)

    def _prefix(self, eamc: EAMCollection, upto: int, changed: bool, out: np.ndarray) -> float:
        """``out`` [N] := dot products summed over rows 0..upto (the last sum plus row ``upto`` where only that row
        changed since it, else afresh, row after row); kept as the last sum. Returns the squared norms' sum."""
        assert self._raw is not None
        index, n = eamc.index, len(eamc)
        if self._dot is not None and self._upto == upto and not changed:
            out[:] = self._dot
        elif self._dot is not None and self._upto == upto - 1 and self._dirty_rows <= {upto}:
            np.add(self._dot, index.dots(self._raw[upto, :n], self._sums[upto], upto, n), out=out)
            self._q = self._q + self._q_sq[upto]
        else:
            rows = slice(0, upto + 1)
            out[:] = sequential_sum(index.dots(self._raw[rows, :n], self._sums[rows], rows, n))
            self._q = sequential_sum(self._q_sq[rows])
        self._dot, self._upto = out, upto
        return float(self._q)


def match(requests: Sequence[RequestEAM], eamc: EAMCollection, upto: int) -> np.ndarray:
    """Cosine similarities [B, N] of each of ``requests`` to every entry over rows 0..upto (row ``i``:
    ``requests[i].similarity(eamc, upto)``); the rows routed since each request's last match are refreshed."""
    index, n = eamc.index, len(eamc)
    by_row: dict[int, list[RequestEAM]] = {}
    for req in requests:
        req._catch_up(eamc)
        for row in req._dirty:
            by_row.setdefault(row, []).append(req)
        req._dirty_rows, req._dirty = req._dirty, set()
    new_dots = None  # row ``upto``'s dot products of the requests that routed it, in ``by_row[upto]`` order
    for row, group in by_row.items():
        counts = np.stack([r.counts[row] for r in group])  # [G, E]
        raw = index.raw_rows(counts - np.stack([r._synced[row] for r in group]), row, n)  # [G, N] what's new
        raw += np.stack([r._raw[row, :n] for r in group])  # type: ignore[index]
        sums = counts.sum(axis=1)
        q_sq = row_sq(sums, (counts * counts).sum(axis=1))
        for i, req in enumerate(group):
            req._raw[row, :n] = raw[i]  # type: ignore[index]
            req._synced[row], req._sums[row], req._q_sq[row] = counts[i], sums[i], q_sq[i]
        if row == upto:
            new_dots = index.dots(raw, sums, row, n)
    out = np.empty((len(requests), n))  # [B, N]; row i stays request i's last sum (never written again)
    q = np.empty((len(requests), 1))
    group = by_row.get(upto, [])
    if (
        new_dots is not None
        and len(group) == len(requests)
        and all(
            g is r and r._dot is not None and r._upto == upto - 1 and r._dirty_rows == {upto}
            for g, r in zip(group, requests)
        )
    ):  # layer by layer through a step: every request's sums grow by row ``upto`` (``_prefix``'s values)
        np.add(np.stack([r._dot for r in requests]), new_dots, out=out)  # type: ignore[misc]
        q[:, 0] = np.array([r._q for r in requests]) + np.array([r._q_sq[upto] for r in requests])
        for i, req in enumerate(requests):
            req._dot, req._q, req._upto = out[i], q[i, 0], upto
    else:
        for i, req in enumerate(requests):
            q[i, 0] = req._prefix(eamc, upto, bool(req._dirty_rows), out[i])
    return index.cosine(out, q, upto, n)


def predict_batch(eamc: EAMCollection, sims: np.ndarray, k: int = 1) -> np.ndarray:
    """Predicted activation ratios [B, L, E], row ``i`` ``eamc.predict(sims[i], k)`` ([B, N] similarities; the
    collection must not be empty). With ``k`` = 1 the best entry's normalised rows: the argmax where it is the only
    best, else ``nearest``'s choice among the tied (its selection, not the first index)."""
    if k != 1:
        return np.stack([eamc.predict(s, k) for s in sims])  # type: ignore[misc]
    return np.stack([eamc.unit_rows(int(i)) for i in best_match(eamc, sims)])


def best_match(eamc: EAMCollection, sims: np.ndarray) -> np.ndarray:
    """[B] the best entry of each row of ``sims`` [B, N]: ``nearest(sims[i], 1)`` (the argmax unless tied)."""
    best = sims.argmax(axis=1)  # [B]
    tied = (sims == sims[np.arange(len(sims)), best][:, None]).sum(axis=1) > 1
    for i in np.flatnonzero(tied).tolist():
        best[i] = eamc.nearest(sims[i], 1)[0]
    return best
