"""The per-step prefetch budget of the predictive policies (MoE-Infinity's and ExpertFlow's
``prefetch_per_layer``): at most that many loads per layer on average in a step, what is left of it spread evenly
over the step's remaining ``prefetch`` calls.
"""

from __future__ import annotations

import math


def call_budget(per_layer: float, num_layers: int, issued: int, layer: int) -> float:
    """Loads the ``prefetch`` call after ``layer`` may issue when ``issued`` were issued earlier in the step: the
    step's remaining budget spread over the calls left (``per_layer`` 0 or less: no limit)."""
    if per_layer <= 0:
        return float("inf")
    share = (per_layer * num_layers - issued) / max(1, num_layers - 1 - layer)
    return float(math.ceil(share)) if math.isfinite(share) else share
