"""Partial sorts for the policies' victim and candidate orders: the first ``n`` entries of a full sort, found by a
partition and a sort of only the entries that can be among them (ties at the cut included), so the result is the
full sort's, entry for entry. Pure NumPy."""

from __future__ import annotations

import numpy as np


def first_lexsorted(primary: np.ndarray, secondary: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` indices of ``np.lexsort((secondary, primary))`` (ascending ``primary``, then ascending
    ``secondary``, then index order; NaN last, as there)."""
    size = len(primary)
    if n <= 0:
        return np.zeros(0, np.int64)
    if n < size and size > 64:  # else the full sort is as cheap
        cut = np.partition(primary, n - 1)[n - 1]  # the n-th smallest primary key
        if cut == cut:  # not NaN: the first n hold no NaN
            near = np.flatnonzero(primary <= cut)  # every entry that can be among the first n, in index order
            return near[np.lexsort((secondary[near], primary[near]))[:n]]
    return np.lexsort((secondary, primary))[:n]


def first_sorted(values: np.ndarray, n: int, hint: list | None = None, partial: bool = True) -> np.ndarray:
    """The first ``n`` indices of ``np.argsort(values, kind="stable")`` (ascending, ties in index order; NaN last).
    ``hint`` (a one-element list kept by the caller between calls) holds a value expected to have at least ``n``
    entries at or below it: when it does, only those are sorted (every other entry comes after them, so the result
    is the same); it is then set to the ``2n``-th smallest (so the next call finds its ``n`` there if the values
    change little). Else a partition first (``partial``), or one full stable sort (faster where the values come in
    long sorted runs)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if hint is not None and hint[0] is not None and n < len(values):
        near = np.flatnonzero(values <= hint[0])
        if len(near) >= n:
            order = near[np.argsort(values[near], kind="stable")]
            hint[0] = values[order[min(2 * n, len(order)) - 1]]
            return order[:n]
    m = n if hint is None else min(2 * n, len(values))  # with a hint: find its next value too
    if partial and n < len(values) and len(values) > 64:
        cut = np.partition(values, m - 1)[m - 1]
        if cut == cut:
            near = np.flatnonzero(values <= cut)
            order = near[np.argsort(values[near], kind="stable")]
            if hint is not None:
                hint[0] = cut
            return order[:n]
    order = np.argsort(values, kind="stable")
    if hint is not None and len(order):
        hint[0] = values[order[m - 1]]
    return order[:n]


def top_stable(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest ``values``, largest first, ties in index order: the first ``n`` of
    ``np.argsort(-values, kind="stable")`` without sorting them all (NaN last, as there)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if n >= len(values):
        return np.argsort(-values, kind="stable")
    # the n-th largest value, selected from the small end of -values: NumPy's selection slows down by an order
    # of magnitude near the end where many equal values (e.g. zeros) sit, not at the other end
    cut = -np.partition(-values, n - 1)[n - 1]
    if cut != cut:  # fewer than n values that are not NaN
        return np.argsort(-values, kind="stable")[:n]
    idx = np.flatnonzero(values >= cut)
    return idx[np.argsort(-values[idx], kind="stable")][:n]


def admitted_run(priority: np.ndarray, free: int, victim_keep: np.ndarray) -> int:
    """How many of the candidates (``priority`` best first) a prefetch admits, one after another until the first
    that fails: its priority must be positive and, once the ``free`` slots are used, above the keep-score of the
    next victim (``victim_keep``, in eviction order; none left: it fails)."""
    ok = priority > 0
    beyond = priority[free:]
    m = min(len(beyond), len(victim_keep))
    ok[free:] &= np.concatenate([beyond[:m] > victim_keep[:m], np.zeros(len(beyond) - m, bool)])
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(priority)


def first_by_distance(
    dist: np.ndarray, ok: np.ndarray, used: np.ndarray, n: int, hint: list[float] | None = None
) -> np.ndarray:
    """The first ``n`` of the ``ok`` entries (a bool mask) by descending ``dist``, then ascending ``used``, then
    index: ``idx[first_lexsorted(-dist[idx], used[idx], n)]`` for ``idx = np.flatnonzero(ok)``, found on the whole
    arrays (blocked entries pushed past every ``ok`` one) and, for one entry, by a maximum instead of a partition.
    ``hint`` (a one-element list, kept by the caller between calls) holds a distance expected to have at least
    ``n`` ok entries at or above it: when it does, only those are ranked (no partition of the whole array; every
    entry below it comes after them, so the result is the same); it is set to the ``2n``-th largest ranked, minus
    one (the distances of a slot's key shrink by one per layer)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if n == 1:
        masked = np.where(ok, dist, -np.inf)
        best = masked.max(initial=-np.inf)
        if best > -np.inf:  # finite or +inf (NaN and -inf, and no ok entry, fail: the general path)
            tied = np.flatnonzero(masked == best)
            return tied[used[tied].argmin(keepdims=True)] if len(tied) > 1 else tied
    elif n < len(dist) and len(dist) > 64:
        if hint is not None and hint[0] == hint[0]:
            near = np.flatnonzero(ok & (dist >= hint[0]))
            if len(near) >= n:
                order = near[np.lexsort((used[near], -dist[near]))]
                hint[0] = float(dist[order[min(2 * n, len(order)) - 1]]) - 1.0
                return order[:n]
        primary = np.where(ok, -dist, np.inf)
        m = min(2 * n, len(dist)) if hint is not None else n  # a hint wants the 2n-th largest too
        cut = np.partition(primary, m - 1)[m - 1]  # the m-th smallest over the ok entries, if there are m
        if cut < np.inf:  # m ok entries, none NaN among the first m (a NaN or no m: the general path)
            near = np.flatnonzero(primary <= cut)
            order = near[np.lexsort((used[near], primary[near]))]
            if hint is not None:
                hint[0] = float(-cut) - 1.0
            return order[:n]
    idx = np.flatnonzero(ok)
    return idx[first_lexsorted(-dist[idx], used[idx], n)]
