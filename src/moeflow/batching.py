"""Which waiting sequences run together: FIFO, or ExpertFlow's expert-aware grouping of predicted routing paths."""

from __future__ import annotations

from typing import Any

import numpy as np

from moeflow.errors import RequestError
from moeflow.sequence import Sequence


def path_predictor(policy: Any, model_dir: str, required: bool) -> Any:
    """The routing predictor: the policy's, else one saved beside the model, else None (or an error)."""
    pred = getattr(policy, "predictor", None)
    if pred is not None and hasattr(pred, "request_path"):
        return pred
    from moeflow.routing.predictor import default_path, load_predictor

    path = default_path(model_dir)
    if path.exists():
        return load_predictor(path)
    if required:
        raise RequestError(f"schedule='expert' needs a routing predictor: train one to {path}")
    return None


def plan_batches(
    seqs: list[Sequence], batch_size: int, schedule: str, max_wait: int, policy: Any, model_dir: str
) -> list[list[int]]:
    """Indices of ``seqs`` per batch, in run order."""
    n, b = len(seqs), batch_size
    fifo = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
    if n <= b or schedule == "fifo":
        return fifo
    predictor = path_predictor(policy, model_dir, required=schedule == "expert")
    if predictor is None:
        return fifo
    from moeflow.scheduler import ExpertAwareScheduler

    paths = [predictor.request_path(np.asarray(s.prompt_ids)) for s in seqs]  # [L, E] each
    return ExpertAwareScheduler(b, max_wait).order(paths)
