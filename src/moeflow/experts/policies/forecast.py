"""ExpertFlow's per-request forecasts: one routing-predictor state per running request (recurrent state, next
position, the routing of its latest token), turned into per-token expert probabilities at the start of each step.
Pure NumPy bookkeeping around the predictor object; the cache decisions stay in ``expertflow``.
Legend: T tokens of a step, L layers, E experts, K top-k.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from moeflow.experts.cache import StepInfo


@dataclass
class RequestState:
    """Per-request predictor state."""

    h: np.ndarray | None  # [H] recurrent state (None: no predictor)
    next_pos: int = 0
    routing: np.ndarray | None = None  # [L, E] multi-hot of the request's latest token (being filled)
    seen: int = 0  # layers of ``routing`` filled
    prev: np.ndarray | None = None  # [L, E] complete routing of the previous token, if known


class Forecaster:
    """Per-token probabilities [T, L, E] for each step from a predictor (``init_state()``, ``predict(tokens,
    state, prev)``), or from expert frequencies when there is none."""

    def __init__(self, num_layers: int, num_experts: int, max_requests: int = 4096):
        self.shape = (num_layers, num_experts)
        self.predictor: object | None = None
        self.max_requests = max_requests
        self.requests: OrderedDict[int, RequestState] = OrderedDict()
        self.segments: list[tuple[RequestState, int, int]] = []
        """The step's requests and their token rows [start, end) in the step's concatenated tokens."""

    def begin_step(self, info: StepInfo, freq: np.ndarray) -> np.ndarray | None:
        """[T, L, E] probabilities of the step's new tokens (requests concatenated in ``info`` order); ``freq``
        [L, E] stands in without a predictor."""
        probs, self.segments, start = [], [], 0
        for rid, toks, pos in zip(info.request_ids, info.token_ids, info.positions):
            req = self._state(rid, pos)
            probs.append(self._predict(req, np.asarray(toks, np.int64), freq))
            self.segments.append((req, start, start + len(toks)))
            req.next_pos, start = pos + len(toks), start + len(toks)
            req.routing, req.seen = np.zeros(self.shape, np.float32), 0
        return np.concatenate(probs) if probs else None

    def last_rows(self) -> list[int]:
        """Row of each request's last token in this step."""
        return [e - 1 for _, s, e in self.segments if e > s]

    def record(self, layer: int, experts: np.ndarray) -> None:
        """The router of ``layer`` chose ``experts`` [T, K]: note each request's latest token's routing."""
        for req, s, e in self.segments:
            if e > s and req.routing is not None and (experts[e - 1] >= 0).all():
                req.routing[layer, experts[e - 1]] = 1.0
                req.seen += 1

    def end_step(self) -> None:
        """A token whose every layer was seen becomes its request's ``prev`` (the predictor's next input)."""
        for req, _, _ in self.segments:
            req.prev = req.routing if req.seen == self.shape[0] else None
        self.segments = []

    def end(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    def _state(self, rid: int, pos: int) -> RequestState:
        req = self.requests.pop(rid, None)
        if req is None or pos != req.next_pos:  # new request (or one restarted): fresh context
            h = self.predictor.init_state() if self.predictor is not None else None  # type: ignore[attr-defined]
            req = RequestState(h, pos)
        self.requests[rid] = req
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)
        return req

    def _predict(self, req: RequestState, tokens: np.ndarray, freq: np.ndarray) -> np.ndarray:
        if self.predictor is None or len(tokens) == 0:
            return np.broadcast_to(freq, (len(tokens), *freq.shape)).astype(np.float32)
        probs, req.h = self.predictor.predict(tokens, req.h, req.prev)  # type: ignore[attr-defined]
        return probs
