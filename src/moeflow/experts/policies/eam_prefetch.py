"""MoE-Infinity's prefetch planning (``MoEInfinityPolicy.prefetch`` calls it; see ``policies.moe_infinity``): after a
layer, the experts of the layers ahead by priority (predicted ratio × layer-proximity decay), each admitted while
its priority beats the keep-score of the next victim in eviction order, within the per-call and per-step budgets,
and, when byte-aware, only where the link model says it pays (``policies.link``). Pure NumPy bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.cache import Key, Load
from moeflow.experts.placement import admit_run
from moeflow.experts.policies.budget import call_budget
from moeflow.experts.policies.ranking import admitted_run, first_lexsorted, top_stable

if TYPE_CHECKING:
    from moeflow.experts.policies.moe_infinity import MoEInfinityPolicy


def plan_prefetch(pol: MoEInfinityPolicy, layer: int) -> list[Load]:
    """The prefetch loads after ``layer`` (routed last; not the last layer), highest priority first."""
    ahead = np.arange(layer + 1, pol.num_layers)  # [A]
    pri = pol._pred[ahead] * (1 - (ahead - layer) / pol.num_layers)[:, None]  # [A, E]
    resident = np.zeros((pol.num_layers, pol.num_experts), bool)
    occupied = pol.slot_layer >= 0
    resident[pol.slot_layer[occupied], pol.slot_expert[occupied]] = True
    budget = min(
        pol.max_prefetch or pol.top_k * len(pol._rids),
        call_budget(pol.prefetch_per_layer, pol.num_layers, pol._prefetched, layer),
    )
    keep = pol._slot_keep(set(pol._needed))  # [S] inf: not evictable (in use, or admitted just now)
    # every step below admits one load or stops, so only the ``budget`` likeliest candidates can matter, and
    # only those above the lowest keep-score once no slot is free (the victims come in one fixed order: lowest
    # keep-score, then least recently requested, since an admitted slot leaves the order and nothing else
    # changes); resident keys have nothing to load
    floor = 0.0 if pol._free else float(keep.min(initial=np.inf))
    live = np.flatnonzero((pri > floor) & ~resident[ahead])  # in index order: ties stay in it
    pri = pri.ravel()
    cands = live[top_stable(pri[live], len(live) if pol.byte_aware else int(min(budget, len(live))))]
    evictable = np.flatnonzero(keep < np.inf)
    # a load displaces at most one victim, so only the first ``budget`` (and candidates) of them can be used
    wanted = int(min(budget, len(evictable), len(cands)))
    first = first_lexsorted(keep[evictable], pol.slot_used[evictable], wanted)
    victims = evictable[first]
    if not pol.byte_aware:  # the loop below, at once: a leading run of the candidates is admitted
        p = pri[cands]
        count = admitted_run(p, len(pol._free), keep[victims])
        keys = [(int(ahead[f // pol.num_experts]), int(f % pol.num_experts)) for f in cands[:count].tolist()]
        olds = [pol.key_in[s] for s in victims[: max(0, count - len(pol._free))].tolist()]
        loads = admit_run(pol, keys, p[:count].tolist(), olds)  # type: ignore[arg-type]
        pol.link.queue(layer, len(loads))
        pol._prefetched += len(loads)
        return loads
    loads: list[Load] = []
    used = 0
    for flat in cands.tolist():
        p = float(pri[flat])
        if p <= 0 or len(loads) >= budget:
            break
        victim = None
        if not pol._free:
            if used >= len(victims) or p <= keep[victims[used]]:  # nothing left that this could displace
                break
            victim = pol.key_in[victims[used]]
        key = (int(ahead[flat // pol.num_experts]), int(flat % pol.num_experts))
        if not _pays(pol, key, victim, layer):
            continue
        used += victim is not None
        load = pol.admit(key, p, victim=victim)
        if load is not None:
            loads.append(load)
            pol.link.queue(layer)
    pol._prefetched += len(loads)
    return loads


def _pays(pol: MoEInfinityPolicy, key: Key, victim: Key | None, layer: int) -> bool:
    """The byte-aware test (``policies.link``) for prefetching ``key`` over ``victim`` after ``layer``."""
    assert pol._pred is not None
    p_use = 1.0 - float(np.exp(-pol.top_k * pol._pred[key]))
    p_victim = 0.0 if victim is None else 1.0 - float(np.exp(-pol.top_k * pol._pred[victim]))
    return pol.link.worth(p_use, p_victim, layer, key[0])


def plan_calibrated(pol: MoEInfinityPolicy, layer: int) -> list[Load]:
    """``variant=calibrated``: the experts of the next ``lookahead`` layers whose calibrated chance of use is at least
    ``min_prob``, highest keep-score (nearest expected use) first, each admitted while its keep-score beats the next
    victim's (lowest keep-score, then least recently requested) or a slot is free, at most ``max_prefetch`` per call
    (0: ``per_request`` × the step's requests)."""
    p_use = pol._chances.p_use
    assert p_use is not None and pol._keep is not None
    ahead = np.arange(layer + 1, min(pol.num_layers, layer + 1 + max(1, pol.lookahead)))  # [A]
    if not len(ahead):
        return []
    occupied = pol.slot_layer >= 0
    resident = np.zeros((pol.num_layers, pol.num_experts), bool)
    resident[pol.slot_layer[occupied], pol.slot_expert[occupied]] = True
    pri = np.where((p_use[ahead] >= pol.min_prob) & ~resident[ahead], pol._keep[ahead], 0.0).ravel()
    budget = pol.max_prefetch or pol.per_request * len(pol._rids)
    live = np.flatnonzero(pri > 0)
    if not len(live):
        return []
    cands = live[top_stable(pri[live], int(min(budget, len(live))))]
    keep = pol._slot_keep(set(pol._needed))  # [S] inf: not evictable
    evictable = np.flatnonzero(keep < np.inf)
    first = first_lexsorted(keep[evictable], pol.slot_used[evictable], int(min(len(cands), len(evictable))))
    victims = evictable[first]
    p = pri[cands]
    count = admitted_run(p, len(pol._free), keep[victims])
    keys = [(int(ahead[f // pol.num_experts]), int(f % pol.num_experts)) for f in cands[:count].tolist()]
    olds = [pol.key_in[s] for s in victims[: max(0, count - len(pol._free))].tolist()]
    loads = admit_run(pol, keys, p[:count].tolist(), olds)  # type: ignore[arg-type]
    pol._prefetched += len(loads)
    return loads
