"""ExpertFlow's eviction order (``ExpertFlowPolicy.distances`` and ``_ranked`` call it; see ``policies.expertflow``):
the table of each key's expected layers until its next use, seen from the layer routed last, and the victims it
ranks over every slot at once (longest expected distance first, demoted keys first of all, then least recently
used, then the lowest slot). Pure NumPy bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moeflow.experts.plan import Key
from moeflow.experts.policies.ranking import first_by_distance

if TYPE_CHECKING:
    from moeflow.experts.policies.expertflow import ExpertFlowPolicy

DEMOTED = 1e9
"""Added to a demoted key's expected distance: demoted keys go first."""


def distance_table(pol: ExpertFlowPolicy) -> np.ndarray:
    """[L, E] ``d1 + (1 − p1) · L / f`` (``policies.expertflow``) at the layer routed last, ``c``: layers after
    ``c`` come round in this step (``d1 = depth − c``, this step's demand), the others in the next (``d1 = L − c +
    depth``, the next step's demand); each row its integer ``d1`` plus its term, written into one array."""
    nl, c = pol.num_layers, pol._pos
    if pol._later is None:  # (1 − p1) · L / f for p1 = this step's demand and the next step's, once per step
        f = np.maximum(pol._fstep, 1e-3)
        pol._later = ((1 - pol._demand) * nl / f, (1 - pol._next) * nl / f)
    depth = np.arange(nl)[:, None]  # [L, 1]
    table = np.empty((nl, pol.num_experts))
    cut = max(c + 1, 0)
    np.add(depth[cut:] - c, pol._later[0][cut:], out=table[cut:])
    np.add(nl - c + depth[:cut], pol._later[1][:cut], out=table[:cut])
    return table


def ranked_victims(
    pol: ExpertFlowPolicy, n: int, protect: set[Key], floor: float | None, held: list[int] | None
) -> list[Key]:
    """The ``n`` best victims in order; the slots of the ``protect``-ed keys (or, given instead, the slots
    ``held``) blocked, and, with a ``floor``, every key expected no later than it."""
    flat = pol.slot_layer * pol.num_experts + pol.slot_expert  # empty slots: < 0 (blocked), clipped to (0, 0)
    dist = pol.distances().take(flat, mode="clip")  # [S]
    if pol._demoted:
        dist[pol._demoted_at.take(flat, mode="clip")] += DEMOTED  # an empty slot's value is never read
    ok = flat >= 0  # [S]
    if held is None:
        get = pol.slot_of.get  # the smaller set: intersecting with the keys view copies every key
        held = [s for s in map(get, protect) if s is not None]
    ok[held] = False
    if floor is not None:
        ok &= dist > floor
    key_in = pol.key_in
    return [key_in[s] for s in first_by_distance(dist, ok, pol.slot_used, n, pol._cut_hint).tolist()]
