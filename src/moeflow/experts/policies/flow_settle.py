"""ExpertFlow's correction for a whole static decode step (``ExpertFlowPolicy.settle_step`` calls it; see
``policies.expertflow``). A static step's routing arrives at once, after the step, and ``boundary.settle`` would call
``observe`` and ``on_access`` layer by layer; nothing is decided between those calls, and each layer's update reads
and writes only that layer's rows (frequency, accuracy, the requests' routing, the pending prefetches of the layer),
so the same values come from one pass over every layer: the same element-wise arithmetic on [L, E] rows, and the
accuracy's mean as an exact integer sum over the count. Pure NumPy bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts import boundary
from moeflow.experts.plan import StepRouting

if TYPE_CHECKING:
    from moeflow.experts.policies.expertflow import ExpertFlowPolicy


def layer_counts(ex: np.ndarray, valid: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] int64: how often each expert id (< ``num_experts``) occurs in the ``valid`` [L, T] rows of ``ex``
    [L, T, K] (per layer, what ``np.bincount(rows.ravel(), minlength=E)[:E]`` counts)."""
    num_layers = ex.shape[0]
    keep = valid[:, :, None] & (ex < num_experts)  # valid rows have ids >= 0
    flat = (np.arange(num_layers)[:, None, None] * num_experts + ex)[keep]
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def settle_static(pol: ExpertFlowPolicy, routing: StepRouting) -> None:
    """``boundary.settle`` with ``observe`` of every layer and ``on_access`` of its served experts, in one pass."""
    boundary.settle(pol, routing, hooks=False)  # the hooks read neither the clock nor what settle changes
    num_layers, num_experts = pol.num_layers, pol.num_experts
    if num_layers == 0:
        return
    ex = np.ascontiguousarray(routing.experts, np.int64)  # [L, T, K]
    valid = (ex >= 0).all(axis=2)  # [L, T]
    n_ok = valid.sum(axis=1)  # [L]
    rows = np.flatnonzero(n_ok > 0)
    if len(rows):
        share = layer_counts(ex, valid, num_experts)[rows] / n_ok[rows, None]
        pol.freq[rows] = pol.decay * pol.freq[rows] + (1 - pol.decay) * share
    fc = pol._fc
    if fc is not None and fc.tokens == ex.shape[1] and len(rows):
        packed = np.take_along_axis(fc.in_top, ex >> 3, axis=2)  # [L, T, K] the byte of each expert
        hits = ((packed >> (7 - (ex & 7))) & 1).sum(axis=2, dtype=np.int64)  # [L, T]
        mean = np.where(valid, hits, 0).sum(axis=1)[rows] / n_ok[rows]  # integers: exact, as ``mean`` is
        pol.accuracy[rows] = pol.decay * pol.accuracy[rows] + (1 - pol.decay) * mean / pol.top_k
        for layer in rows.tolist():
            pol.forecast.record(layer, ex[layer])
    pol._observe_rest(ex, valid)
    served = [np.flatnonzero(routing.served[layer]).tolist() for layer in range(num_layers)]
    if pol._pending:
        ok = (ex >= 0) & (ex < num_experts)
        chosen = np.zeros((num_layers, num_experts), bool)
        chosen[np.broadcast_to(np.arange(num_layers)[:, None, None], ex.shape)[ok], ex[ok]] = True
        demote = [k for k in pol._pending if not chosen[k]]
        if demote:
            pol._demote(demote)
    used = [(layer, e) for layer, es in enumerate(served) for e in es]
    if pol._pending:
        pol._pending.difference_update(used)
    if pol._demoted:
        pol._demoted.difference_update(used)
        pol._demoted_at[routing.served != 0] = False
    last = num_layers - 1
    pol._pos, pol._table, pol._in_use = last, None, {(last, e) for e in served[last]}
