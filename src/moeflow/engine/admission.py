"""Admission of continuous batching: which waiting requests take the free KV rows at a step boundary.

With a routing path per request (the predictor's mean expert use over the prompt, ``moeflow.batching``), the
choice is ExpertFlow's (``moeflow.scheduler.admit``): requests that add the fewest expected new experts to the
running batch go first, but none that has waited ``max_wait`` steps is passed over for a younger one. Without a
path function (no predictor, or ``schedule='fifo'``), first come, first served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moeflow.batching import path_predictor
from moeflow.scheduler import admit
from moeflow.sequence import Sequence


class Admission:
    """Chooses admitted requests from their paths (``path_of(seq)`` -> [L, E], or None: FIFO)."""

    def __init__(self, max_wait: int = 2, path_of: Callable[[Sequence], np.ndarray] | None = None):
        if max_wait < 0:
            raise ValueError("max_wait must be at least 0")
        self.max_wait, self.path_of = max_wait, path_of

    @classmethod
    def for_llm(cls, llm: Any) -> Admission:
        """The engine's configured schedule: expert-aware when a routing predictor is at hand (FIFO otherwise)."""
        cfg = llm.config
        if cfg.schedule == "fifo":
            return cls(cfg.max_wait)
        predictor = path_predictor(llm.policy, llm.model_dir, required=cfg.schedule == "expert")
        if predictor is None:
            return cls(cfg.max_wait)
        return cls(cfg.max_wait, lambda seq: predictor.request_path(np.asarray(seq.prompt_ids)))

    def path(self, seq: Sequence) -> np.ndarray | None:
        return None if self.path_of is None else self.path_of(seq)

    def choose(self, running: list[Any], waiting: list[Any], waited: list[int], free: int) -> list[int]:
        """Indices into ``waiting`` (arrival order) to admit into ``free`` rows."""
        if self.path_of is None or not waiting:
            return list(range(min(free, len(waiting))))
        return admit(running, waiting, waited, free, self.max_wait)
