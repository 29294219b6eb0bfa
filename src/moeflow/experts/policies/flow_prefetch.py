"""ExpertFlow's prefetch planning (``ExpertFlowPolicy.prefetch`` calls it; see ``policies.expertflow``): for the
trusted layers ahead, nearest first, the likeliest experts within each layer's quota and the step's budget, each
admitted only over a key expected to be needed later than itself (:class:`Later`) and, when byte-aware, only where
the link model says it pays (``policies.link``). Pure NumPy bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.cache import Key, Load
from moeflow.experts.policies.budget import call_budget

if TYPE_CHECKING:
    from moeflow.experts.policies.expertflow import ExpertFlowPolicy


@dataclass(frozen=True)
class Later:
    """A prefetch may evict only keys expected to be needed later than ``floor`` layers from now."""

    policy: ExpertFlowPolicy
    floor: float

    def __call__(self, key: Key) -> bool:
        return self.policy._distance(key) > self.floor


def plan_prefetch(pol: ExpertFlowPolicy, layer: int, lookahead: int | None) -> list[Load]:
    """Loads for the trusted layers after ``layer`` (at most ``lookahead`` of them, default ``max_lookahead``)."""
    layers = pol.horizon(layer, lookahead)
    quota = pol.quotas(layers)
    cap = call_budget(pol.prefetch_per_layer, pol.num_layers, pol._prefetched, layer)
    loads: list[Load] = []
    protect = set(pol._in_use)
    resident = pol.slot_of
    for ly in layers:
        order = np.argsort(-pol._demand[ly], kind="stable")[: quota[ly]]
        for e, p in zip(order.tolist(), pol._demand[ly].take(order).tolist()):
            if p < pol.min_prob or len(loads) >= cap:
                break
            key = (ly, e)
            protect.add(key)
            if key in resident:
                continue
            mine = pol._distance(key)
            if pol.byte_aware:
                victim = None if pol._free else pol.select_victim(protect, ly, Later(pol, mine))
                if (victim is None and not pol._free) or not _pays(pol, p, victim, layer, ly):
                    continue
                load = pol.admit(key, (pol.num_layers - ly) + p, protect, victim=victim)
            else:
                load = pol.admit(key, (pol.num_layers - ly) + p, protect, Later(pol, mine))
            if load is None:
                continue  # nothing resident is expected later than this key
            pol.link.queue(layer)
            pol._pending.add(key)
            loads.append(load)
    pol._prefetched += len(loads)
    return loads


def _pays(pol: ExpertFlowPolicy, p_use: float, victim: Key | None, layer: int, target: int) -> bool:
    """The byte-aware test (``policies.link``) for a prefetch into ``target`` over ``victim`` after ``layer``."""
    p_victim = 0.0
    if victim is not None:
        p_victim = float(pol._demand[victim] if victim[0] > pol._pos else pol._next[victim])
    return pol.link.worth(p_use, p_victim, layer, target)
