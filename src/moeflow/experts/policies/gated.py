"""Prefetch by the hybrid routing predictor (issue 15): an LRU cache that, once layer ``l`` has routed, loads the
experts of layer ``l + d`` that a ``Forecast`` made ``d`` layers early (``routing.hybrid``: speculative gating for
the next layers, mixed with ExpertFlow's path predictor and the last token by measured recall) expects the step to
use with a chance of at least ``min_prob``, most likely first, at most ``max_per_layer`` of them. A step's chance
of using expert e is 1 - prod_t (1 - min(1, score_te)) over its tokens.

The forecasts come from outside the policy (``observe_forecast``): in the simulator from recorded router inputs
(``sim.simulate(forecast=...)``). The engine does not make them yet: the gates inside the decode step are not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow.experts.cache import register_policy
from moeflow.experts.plan import Forecast, Load, PolicyContext
from moeflow.experts.policies.classic import LRUPolicy
from moeflow.experts.policies.options import apply_options


@dataclass
class ForecastLRU(LRUPolicy):
    """LRU residency; prefetches what the latest forecast expects (options ``min_prob``, ``max_per_layer``)."""

    min_prob: float = 0.5
    max_per_layer: int = 0
    """0: the layer's top-k times the step's tokens."""

    def __post_init__(self) -> None:
        self.name = "lru-forecast"
        self._forecast: Forecast | None = None

    def setup(self, context: PolicyContext) -> None:
        super().setup(context)
        apply_options(self, context.options, ("min_prob", "max_per_layer"))

    def observe_forecast(self, forecast: Forecast) -> None:
        self._forecast = forecast

    def prefetch(self, layer: int) -> list[Load]:
        f, self._forecast = self._forecast, None
        if f is None or f.layer != layer + f.distance:
            return []
        p_use = 1.0 - np.prod(1.0 - np.clip(f.scores, 0.0, 1.0), axis=0)  # [E]
        cap = self.max_per_layer or self.top_k * f.scores.shape[0]
        order = [int(e) for e in np.argsort(-p_use, kind="stable")[:cap] if p_use[e] >= self.min_prob]
        wanted = [(f.layer, e) for e in order if (f.layer, e) not in self.slot_of]
        protect = {(f.layer, e) for e in order}
        loads = (self.admit(key, priority=float(p_use[key[1]]), protect=protect) for key in wanted)
        return [load for load in loads if load is not None]


register_policy("lru-forecast", ForecastLRU)
