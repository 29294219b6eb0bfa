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


def first_sorted(values: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` indices of ``np.argsort(values, kind="stable")`` (ascending, ties in index order; NaN last)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if n < len(values) and len(values) > 64:
        cut = np.partition(values, n - 1)[n - 1]
        if cut == cut:
            near = np.flatnonzero(values <= cut)
            return near[np.argsort(values[near], kind="stable")[:n]]
    return np.argsort(values, kind="stable")[:n]


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
