"""The matching views of an EAM collection's entries (``routing.eam``): expert-major counts, per-row sums and the
entries' squared norms, built once and refreshed entry by entry as admissions change them, and the similarity of a
query EAM to every entry in the *canonical* form shared with the running requests' cached matching
(``routing.eam_match``).

Canonical form (``q``: the query's counts, ``C``: an entry's, row ``r`` = one layer, ``s``/``S`` their row sums):

* the dot product of row ``r``'s normalised rows is ``raw / (s · S)`` with ``raw = Σ_e q[r, e] · C[r, e]``: for
  integer counts (what EAMs hold) ``raw`` and ``s · S`` are exact integers in float64 whatever the summation order,
  so the quotient is the one correctly rounded value, however (and with whichever other requests) it was computed:
  from scratch over all experts, or grown token by token from the new experts' entry counts only;
* the squared norm of a normalised row is ``Σ_e q² / s²`` (likewise exact up to the one division);
* over rows ``0..u`` the dot products and the squared norms are summed row after row in layer order (the sums
  a layer-by-layer match extends), and the cosine is ``dot · (1 / sqrt(e_sq)) · (1 / sqrt(q_sq))`` (0 where a
  norm is 0; the entries' reciprocal norms are kept per row).

Entries whose compared rows are proportional (every count scaled by one factor) get the same bits, so they tie
exactly. The expert-major counts are float32 (exact for the float32 counts the collection stores); a product over
them is taken in float32 when every partial sum is an integer below 2**24 (exact), else in float64.

Pure NumPy. Legend: L layers, E experts, N entries (``cap`` buffered), U rows matched.
"""

from __future__ import annotations

import numpy as np

UNIT_CACHE = 256
"""Entries whose normalised rows are kept (for predictions); the oldest is dropped beyond that."""


def row_normalise(m: np.ndarray) -> np.ndarray:
    """Each layer row [..., L, E] divided by its sum (all-zero rows stay zero)."""
    s = m.sum(axis=-1, keepdims=True)
    if m.dtype == np.float64 and s.all():  # the usual case: no mask (the same quotients)
        return m / s
    return np.divide(m, s, out=np.zeros_like(m, dtype=np.float64), where=s > 0)


def quotient(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den`` is 0 (then ``num`` is 0 too: no routing on either side)."""
    if np.all(den):  # the usual case: no mask (the same quotients)
        return num / den
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def reciprocal_sqrt(x: np.ndarray) -> np.ndarray:
    """``1 / sqrt(x)`` elementwise, 0 where ``x`` is 0."""
    return quotient(np.ones_like(x), np.sqrt(x))


def row_sq(sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Squared norms of normalised rows from their sums and sums of squares (0 for an all-zero row)."""
    return quotient(squares, sums * sums)


def sequential_sum(values: np.ndarray) -> np.ndarray:
    """Sum over axis 0, one row after another in order (``add.reduce`` over the outer axis; a 1-D array is summed
    by ``cumsum``, as NumPy reduces a contiguous axis pairwise)."""
    if values.ndim == 1:
        return np.cumsum(values)[-1] if len(values) else np.float64(0.0)
    return np.add.reduce(values, axis=0)


class EntryIndex:
    """Matching views of the entries ``buf[:n]`` of a collection (``buf`` [cap, L, E] float32 counts)."""

    def __init__(self, buf: np.ndarray):
        counts = buf.astype(np.float64)  # [cap, L, E]
        self.counts_t = np.ascontiguousarray(buf.transpose(1, 2, 0), np.float32)  # [L, E, cap] expert rows
        self.max_count = float(buf.max()) if buf.size else 0.0  # an upper bound (kept through refreshes)
        sums = counts.sum(axis=2)  # [cap, L] (each a contiguous row's sum, as ``refresh`` computes it)
        self.row_sums = np.ascontiguousarray(sums.T)  # [L, cap]
        self.sq_cum = np.cumsum(row_sq(sums, (counts * counts).sum(axis=2)).T, axis=0)  # [L, cap] rows 0..l
        self.inv_norm = reciprocal_sqrt(self.sq_cum)  # [L, cap] 1 / the norm over rows 0..l
        self._unit: dict[int, np.ndarray] = {}

    @property
    def capacity(self) -> int:
        return self.counts_t.shape[2]

    def refresh(self, buf: np.ndarray, idx: int) -> None:
        """Entry ``idx`` was rewritten: its columns only (the same values a rebuild gives)."""
        counts = buf[idx].astype(np.float64)  # [L, E]
        sums = counts.sum(axis=1)
        self.counts_t[:, :, idx] = buf[idx]
        self.max_count = max(self.max_count, float(buf[idx].max()))
        self.row_sums[:, idx] = sums
        self.sq_cum[:, idx] = np.cumsum(row_sq(sums, (counts * counts).sum(axis=1)))
        self.inv_norm[:, idx] = reciprocal_sqrt(self.sq_cum[:, idx])
        self._unit.pop(idx, None)

    def unit(self, buf: np.ndarray, idx: int) -> np.ndarray:
        """Entry ``idx``'s normalised rows [L, E] (``row_normalise`` of its counts; cached, read only)."""
        out = self._unit.get(idx)
        if out is None:
            out = row_normalise(buf[idx].astype(np.float64))
            out.flags.writeable = False
            if len(self._unit) >= UNIT_CACHE:
                del self._unit[next(iter(self._unit))]
            self._unit[idx] = out
        return out

    def _product(self, query: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``query @ counts`` (float32 ``counts``) exactly for integer counts: in float32 when no sum can reach
        2**24, else in float64."""
        if np.abs(query).sum(axis=-1).max(initial=0.0) * self.max_count < 2**24:
            return np.matmul(query.astype(np.float32), counts).astype(np.float64)
        return np.matmul(query, counts.astype(np.float64))

    def raw_rows(self, counts: np.ndarray, row: int, n: int) -> np.ndarray:
        """``raw`` [G, n] of ``counts`` [G, E] (one row of G queries) with the first ``n`` entries' row ``row``:
        only the experts some query routed are read (a decode token adds K of E)."""
        cols = np.flatnonzero(counts.any(axis=0))
        if 2 * len(cols) >= counts.shape[1]:
            return self._product(counts, self.counts_t[row, :, :n])
        return self._product(counts[:, cols], self.counts_t[row, cols, :n])

    def raw_columns(self, counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``raw`` [L, len(idx)] of one query's ``counts`` [L, E] with entries ``idx``, every row."""
        return self._product(counts[:, None, :], self.counts_t[:, :, idx])[:, 0]

    def dots(self, raw: np.ndarray, sums: np.ndarray, rows: slice | int, n: int) -> np.ndarray:
        """Dot products of normalised rows from ``raw`` [..., n] of query rows ``rows`` with sums ``sums``."""
        den = self.row_sums[rows, :n] * (sums[..., None] if np.ndim(sums) else sums)
        return quotient(raw, den)

    def cosine(self, dots: np.ndarray, q_sq: np.ndarray, upto: int, n: int) -> np.ndarray:
        """Cosine similarities [..., n] from the dot products and the queries' squared norms (over rows 0..upto)."""
        return dots * self.inv_norm[upto, :n] * reciprocal_sqrt(np.asarray(q_sq, np.float64))

    def similarity(self, query: np.ndarray, upto: int, n: int) -> np.ndarray:
        """Cosine similarity [n] of ``query`` [L, E] to the first ``n`` entries over rows 0..upto (canonical)."""
        q = np.asarray(query, np.float64)[: upto + 1]  # [U, E]
        raw = self._product(q[:, None, :], self.counts_t[: upto + 1, :, :n])[:, 0]  # [U, n]
        sums = q.sum(axis=1)  # [U]
        dots = sequential_sum(self.dots(raw, sums, slice(0, upto + 1), n))
        return self.cosine(dots, sequential_sum(row_sq(sums, (q * q).sum(axis=1))), upto, n)


def cosine(dots: np.ndarray, q_sq: float | np.ndarray, e_sq: np.ndarray) -> np.ndarray:
    """Cosine similarities from dot products ``dots`` [..., N] and squared norms: of the query ``q_sq`` (a float, or
    [B, 1] for [B, N] dots) and of the entries ``e_sq`` [N] (0 where either norm is 0)."""
    denom = np.sqrt(q_sq * e_sq)
    if denom.all():  # the usual case: no mask
        return np.divide(dots, denom, out=denom)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
