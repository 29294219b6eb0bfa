"""Expert-aware token scheduling (ExpertFlow): which waiting requests run together, so that a batch's tokens
share experts, without starving anyone.

A request's *routing path* is an L×E array: the probability that one of its tokens uses expert ``e`` of layer
``l`` (rows sum to top-k; e.g. the predictor's mean over the prompt's tokens, or the shares recorded in a trace),
or a 0/1 set of experts. For a batch ``S`` the expected number of distinct experts one decode step touches in
layer ``l`` is ``Σ_e 1 − Π_{r∈S} (1 − p_r[l, e])`` (for 0/1 paths: the size of the union), which is what
scheduling lowers: fewer distinct experts per step means fewer expert loads and a smaller grouped compute.

Batches are formed round by round. Each round takes the requests that must go now (fairness, below), seeds with
the oldest waiting request, and fills greedily with the request that adds the fewest expected new experts to
the batch (ties: the oldest). Fairness bound ``W`` (``max_wait``): request ``i`` (in arrival order) runs no later
than round ``i // B + W``, i.e. at most ``W`` rounds later than first-come-first-served would run it; ``W = 0``
is FIFO. Pure NumPy; the engine runs each batch independently, so outputs do not depend on the grouping.

Shapes: ``N`` requests, ``L`` layers, ``E`` experts, ``K`` top-k, ``n`` tokens of a request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ExpertAwareScheduler:
    def __init__(self, batch_size: int, max_wait: int = 2):
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must be at least 0")
        self.batch_size, self.max_wait = batch_size, max_wait

    def order(self, paths: Sequence[np.ndarray]) -> list[list[int]]:
        """A partition of ``range(len(paths))`` into batches of at most ``batch_size``, in run order (each batch
        ascending). ``paths`` [N] of [L, E] arrays with values in [0, 1]."""
        n, b = len(paths), self.batch_size
        if n == 0:
            return []
        p = np.stack([np.clip(np.asarray(x, np.float64), 0.0, 1.0).reshape(-1) for x in paths])  # [N, L*E]
        deadline = np.arange(n) // b + self.max_wait  # [N]
        waiting = np.ones(n, bool)
        batches: list[list[int]] = []
        while waiting.any():
            batch = self._round(p, waiting, deadline, len(batches))
            waiting[batch] = False
            batches.append(sorted(batch))
        return batches

    def _round(self, p: np.ndarray, waiting: np.ndarray, deadline: np.ndarray, rnd: int) -> list[int]:
        """One batch: the overdue requests, the oldest one, then the cheapest additions."""
        idx = np.flatnonzero(waiting)
        batch = [int(i) for i in idx[deadline[idx] <= rnd]]  # at most batch_size by construction
        if not batch:
            batch = [int(idx[0])]
        miss = np.prod(1.0 - p[batch], axis=0)  # [L*E] chance no batch member uses each expert
        free = np.setdiff1d(idx, batch)  # ascending: argmin's first minimum is the oldest
        while len(batch) < self.batch_size and len(free):
            gain = p[free] @ miss  # [F] expected experts each candidate adds
            j = int(np.argmin(gain))
            pick = int(free[j])
            batch.append(pick)
            miss *= 1.0 - p[pick]
            free = np.delete(free, j)
        return batch


def fifo(n: int, batch_size: int) -> list[list[int]]:
    """First come, first served: ``[[0..B-1], [B..2B-1], ...]``."""
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def expected_distinct(paths: Sequence[np.ndarray]) -> np.ndarray:
    """[L]: expected distinct experts per layer of one decode step of a batch with these paths [L, E]."""
    p = np.clip(np.stack([np.asarray(x, np.float64) for x in paths]), 0.0, 1.0)  # [S, L, E]
    return (1.0 - np.prod(1.0 - p, axis=0)).sum(axis=-1)


def distinct_per_batch(batches: Sequence[Sequence[int]], paths: Sequence[np.ndarray]) -> np.ndarray:
    """[num_batches, L]: ``expected_distinct`` of each batch."""
    return np.stack([expected_distinct([paths[i] for i in b]) for b in batches])


def usage_path(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """A request's recorded path [L, E] from its routing ``experts`` [n, L, K]: share of tokens per expert."""
    valid = (experts >= 0).all(axis=(1, 2))
    ex = experts[valid]
    out = np.zeros((experts.shape[1], num_experts))
    if len(ex):
        layer = np.broadcast_to(np.arange(ex.shape[1])[None, :, None], ex.shape)
        np.add.at(out, (layer.ravel(), ex.ravel()), 1.0)
        out /= len(ex)
    return out


def decode_distinct(routes: Sequence[np.ndarray], num_experts: int) -> tuple[np.ndarray, int]:
    """Distinct experts per layer a batch really touches while decoding together: ``routes`` holds each
    member's decode routing [n_r, L, K]; decode step ``j`` runs token ``j`` of every member with ``n_r > j``.
    Returns (sum over steps of the per-layer union sizes [L], number of steps)."""
    steps = max((len(r) for r in routes), default=0)
    num_layers = routes[0].shape[1] if routes else 0
    total = np.zeros(num_layers)
    for j in range(steps):
        ex = np.stack([r[j] for r in routes if len(r) > j])  # [S, L, K]
        hot = np.zeros((num_layers, num_experts + 1), bool)
        layer = np.broadcast_to(np.arange(num_layers)[None, :, None], ex.shape)
        hot[layer.ravel(), np.where(ex < 0, num_experts, ex).ravel()] = True
        total += hot[:, :num_experts].sum(axis=1)
    return total, steps


def admit(
    running: Sequence[np.ndarray],
    waiting: Sequence[np.ndarray],
    waited: Sequence[int],
    free: int,
    max_wait: int,
) -> list[int]:
    """Continuous batching's admission: which of ``waiting`` (paths [L, E], in arrival order, each having waited
    ``waited`` engine steps) take the ``free`` rows beside the ``running`` batch. Every request fits: all of them.
    Otherwise the overdue (``waited >= max_wait``) go first, oldest first; then, one at a time, the request adding
    the fewest expected new experts to the batch so far (ties: the oldest). So no request that has waited
    ``max_wait`` steps is passed over for a younger one, and ``max_wait = 0`` is FIFO. Returns ascending indices."""
    n = len(waiting)
    if free <= 0 or n == 0:
        return []
    if n <= free:
        return list(range(n))
    overdue = [i for i in range(n) if waited[i] >= max_wait]
    chosen = overdue[:free]
    if len(chosen) < free:
        p = np.stack([np.clip(np.asarray(x, np.float64), 0.0, 1.0).reshape(-1) for x in waiting])  # [N, L*E]
        miss = np.ones(p.shape[1])  # chance no batch member uses each expert
        for x in [*running, *(waiting[i] for i in chosen)]:
            miss *= 1.0 - np.clip(np.asarray(x, np.float64), 0.0, 1.0).reshape(-1)
        free_idx = np.setdiff1d(np.arange(n), chosen)  # ascending: argmin's first minimum is the oldest
        while len(chosen) < free:
            j = int(np.argmin(p[free_idx] @ miss))
            pick = int(free_idx[j])
            chosen.append(pick)
            miss *= 1.0 - p[pick]
            free_idx = np.delete(free_idx, j)
    return sorted(chosen)
