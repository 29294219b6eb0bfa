"""The hooks of a cache policy: what the engine and the simulator tell it about a run (steps, routing, timing,
accesses, finished requests) and the loads it may ask for in return, each a no-op by default.
:class:`~moeflow.experts.cache.CachePolicy` builds its bookkeeping on them; a policy overrides those it needs.
"""

from __future__ import annotations

import numpy as np

from moeflow.experts.plan import Forecast, Key, Load, PolicyContext, StepInfo


class PolicyHooks:
    """The hook methods of :class:`~moeflow.experts.cache.CachePolicy` (override as needed)."""

    def setup(self, context: PolicyContext) -> None:
        """Called once after ``bind`` with what the engine or simulator knows (model dir, trace, options)."""

    def begin_step(self, info: StepInfo) -> None:
        """A forward step starts (token ids known, nothing routed yet)."""

    def observe(self, layer: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """The router of ``layer`` chose ``experts`` [T, K] (gate ``weights`` [T, K]) for this step's tokens."""

    def observe_forecast(self, forecast: Forecast) -> None:
        """A routing forecast for a layer ahead, before ``prefetch`` of the layer that just routed (the simulator's
        ``forecast=`` from recorded router inputs; the engine makes none yet)."""

    def prefetch(self, layer: int) -> list[Load]:
        """After ``layer`` was routed: loads to start now for layers ahead (bookkeeping done via ``admit``)."""
        return []

    def prefetch_next_step(self) -> list[Load]:
        """Between static decode steps: loads for the coming step, planned before it starts (default: what
        ``prefetch(-1)`` plans before a step's first layer)."""
        return self.prefetch(-1)

    def end_step(self) -> None:
        """The forward step finished."""

    def end_request(self, request_id: int) -> None:
        """Request ``request_id`` finished (its routing is complete)."""

    def on_timing(self, layer_s: float, copy_s: float) -> None:
        """Measured (engine) or modelled (simulator) seconds of one layer's compute and of one expert copy."""

    def on_access(self, key: Key) -> None:
        """``key`` was requested (hit or miss) at the current clock."""

    def on_admit(self, key: Key) -> None:
        """``key`` was brought in by a prefetch (not requested yet)."""
