"""ExpertFlow's per-request forecasts: one routing-predictor state per running request (recurrent state, next
position, the routing of its latest token), turned at the start of each step into what the policy plans from
(``StepForecast``): the step's demand, each token's predicted top-k (a packed bit mask), and each request's last
token's probabilities; then the demand estimates of this step and the next (``step_demand``). Also the predictor's
plumbing: which one is used (``load_predictor``: given, beside the model, or none, with a warning, and then expert
frequencies stand in).
The per-token probabilities [T, L, E] are consumed in chunks of ``CHUNK`` tokens and never held whole (a 2048-token
prompt at 48 x 128 would be 50 MB). Pure NumPy bookkeeping around the predictor object; the cache decisions stay in
``expertflow``. Legend: T tokens of a step, L layers, E experts, K top-k, B requests of the step.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.experts.cache import StepInfo


@dataclass
class RequestState:
    """Per-request predictor state."""

    h: np.ndarray | None  # [H] recurrent state (None: no predictor)
    next_pos: int = 0
    routing: np.ndarray | None = None  # [L, E] multi-hot of the request's latest token (being filled)
    seen: int = 0  # layers of ``routing`` filled
    prev: np.ndarray | None = None  # [L, E] complete routing of the previous token, if known


CHUNK = 256
"""Tokens whose probabilities are held at once."""
CLIP = 1 - 1e-6
"""Probabilities are clipped to [0, CLIP] before the demand's logarithms."""


@dataclass(frozen=True)
class StepForecast:
    """What one step's per-token probabilities come to."""

    tokens: int
    log_miss: np.ndarray
    """[L, E] float32: Σ_t log(1 − p[t, l, e]), tokens in step order (the step's demand is 1 − exp of it)."""
    in_top: np.ndarray
    """[L, T, ceil(E / 8)] uint8, bits packed as ``np.packbits`` packs them: whether each expert is among a token's
    ``top_k`` likeliest of a layer (the set ``np.argpartition`` picks)."""
    ends: np.ndarray
    """[B, L, E] float32 clipped probabilities of each request's last token in the step."""

    def hits(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """[T] int64: how many of each token's routed ``experts`` [T, K] (ids >= 0, or rows ignored by the caller)
        were among its predicted top-k of ``layer``."""
        ex = np.asarray(experts, np.int64)
        top = self.in_top[layer]  # [T, ceil(E / 8)], contiguous
        rows = np.arange(0, top.size, top.shape[1])[: len(ex), None]  # [T, 1] each row's first byte
        packed = top.ravel().take(rows + (ex >> 3))  # [T, K] the byte of each expert
        return ((packed >> (7 - (ex & 7))) & 1).sum(axis=1, dtype=np.int64)


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
        self._routing: np.ndarray | None = None  # [B, L, E] the requests' ``routing`` (theirs are its rows)
        self._last_rows = np.zeros(0, np.int64)  # [B'] each request's last token row (requests with tokens)
        self._with_tokens = np.zeros(0, np.int64)  # [B'] which requests those are
        # [B] layers recorded of each request's latest token (stacked routing)
        self._seen = np.zeros(0, np.int64)

    def begin_step(self, info: StepInfo, freq: np.ndarray, top_k: int) -> StepForecast | None:
        """The forecast of the step's new tokens (requests concatenated in ``info`` order); ``freq`` [L, E] stands
        in without a predictor. None for a step without requests."""
        self.segments, start = [], 0
        total = sum(len(t) for t in info.token_ids)
        num_layers, num_experts = self.shape
        in_top = np.zeros((num_layers, total, -(-num_experts // 8)), np.uint8)
        log_miss: np.ndarray | None = None
        buf: np.ndarray | None = None  # [1 + CHUNK, L, E]: the running sum, then a chunk's log(1 - p)
        ends = []
        for rid, toks, pos in zip(info.request_ids, info.token_ids, info.positions):
            req = self._state(rid, pos)
            last, row = None, start
            for probs in self._predict(req, np.asarray(toks, np.int64), freq):  # [t, L, E] chunks in order
                n = len(probs)
                if buf is None or len(buf) < n + 1 or buf.dtype != probs.dtype:
                    buf = np.empty((max(n, CHUNK) + 1, *self.shape), probs.dtype)
                logs = buf[1 : n + 1]
                np.clip(probs, 0.0, CLIP, out=logs)
                np.log1p(np.negative(logs, out=logs), out=logs)
                # one sequential sum over every token of the step, as a [T, L, E] array's sum(axis=0) would be
                if log_miss is None:
                    log_miss = logs.sum(axis=0)
                else:
                    buf[0] = log_miss
                    log_miss = np.add.reduce(buf[: n + 1])
                in_top[:, row : row + n] = np.packbits(top_mask(probs, top_k), axis=-1).transpose(1, 0, 2)
                last, row = probs[-1], row + n
            if last is not None:
                ends.append(np.clip(last, 0.0, CLIP))
            self.segments.append((req, start, start + len(toks)))
            req.next_pos, start = pos + len(toks), start + len(toks)
        if not self.segments:
            return None
        self._stack_routing()
        if log_miss is None:
            log_miss = np.zeros(self.shape, np.float32)
        end = np.stack(ends) if ends else np.zeros((0, *self.shape), np.float32)
        return StepForecast(start, log_miss, in_top, end)

    def load_predictor(self, spec: object, model_dir: str | os.PathLike | None, top_k: int) -> str | None:
        """Use the routing predictor ``spec`` (an object, a path, or None: the one beside the model in
        ``model_dir``); returns where it came from. Without one, a warning says so and the forecasts come from
        expert frequencies (None). One of another shape is an error."""
        from moeflow.routing.predictor import (
            resolve_predictor,  # torch-backed loader: imported only when used
        )

        pred, source = resolve_predictor(spec, model_dir)
        if pred is None:
            warnings.warn(
                "expertflow: no routing predictor found (pass options predictor=PATH or train one with "
                "`moeflow predictor train`); predicting from expert frequencies instead",
                stacklevel=3,
            )
            return None
        if pred.shape != self.shape or pred.cfg.top_k != top_k:
            raise MoeflowError(
                f"predictor {source} is for {pred.shape[0]} layers × {pred.shape[1]} experts (top-{pred.cfg.top_k}); "
                f"the model has {self.shape[0]} × {self.shape[1]} (top-{top_k}): train one on its traces"
            )
        self.predictor = pred
        return source

    def _stack_routing(self) -> None:
        """A fresh ``routing`` for each of the step's requests: rows of one [B, L, E] array when the requests are
        distinct (then ``record`` writes them at once), else one array each."""
        reqs = [req for req, _, _ in self.segments]
        self._routing = None
        if len({id(r) for r in reqs}) == len(reqs):
            self._routing = np.zeros((len(reqs), *self.shape), np.float32)
            for i, req in enumerate(reqs):
                req.routing, req.seen = self._routing[i], 0
            self._with_tokens = np.array([i for i, (_, s, e) in enumerate(self.segments) if e > s], np.int64)
            self._last_rows = np.array([e - 1 for _, s, e in self.segments if e > s], np.int64)
            self._seen = np.zeros(len(reqs), np.int64)  # the requests' ``seen``, counted until ``end_step``
        else:
            for req in reqs:
                req.routing, req.seen = np.zeros(self.shape, np.float32), 0

    def record(self, layer: int, experts: np.ndarray, all_valid: bool = False) -> None:
        """The router of ``layer`` chose ``experts`` [T, K] (``all_valid``: the caller knows no id is -1): note each
        request's latest token's routing."""
        if self._routing is not None:
            last = experts[self._last_rows]  # [B', K]
            if all_valid:
                reqs = self._with_tokens
            else:
                ok = (last >= 0).all(axis=1)
                reqs, last = self._with_tokens[ok], last[ok]
            self._routing[reqs[:, None], layer, last] = 1.0
            self._seen[reqs] += 1  # distinct requests
            return
        for req, s, e in self.segments:
            if e > s and req.routing is not None and (experts[e - 1] >= 0).all():
                req.routing[layer, experts[e - 1]] = 1.0
                req.seen += 1

    def end_step(self) -> None:
        """A token whose every layer was seen becomes its request's ``prev`` (the predictor's next input)."""
        if self._routing is not None:
            for (req, _, _), seen in zip(self.segments, self._seen.tolist()):
                req.seen = seen
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

    def _predict(self, req: RequestState, tokens: np.ndarray, freq: np.ndarray) -> Iterator[np.ndarray]:
        """Probabilities [t, L, E] of ``tokens`` in chunks of at most ``CHUNK`` tokens (advances ``req.h``)."""
        if len(tokens) == 0:
            return
        if self.predictor is None:
            row = freq.astype(np.float32)
            for s in range(0, len(tokens), CHUNK):
                yield np.broadcast_to(row, (min(CHUNK, len(tokens) - s), *row.shape))
            return
        pred = self.predictor
        if not hasattr(pred, "encode"):  # a predictor object without the split forward: whole, as given
            probs, req.h = pred.predict(tokens, req.h, req.prev)  # type: ignore[attr-defined]
            yield probs
            return
        mix, req.h = pred.encode(tokens, req.h, req.prev)  # [T, H]
        for s in range(0, len(tokens), CHUNK):
            yield pred.head(mix[s : s + CHUNK])


def step_demand(
    fc: StepForecast | None, freq: np.ndarray, accuracy: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a step of ``batch`` requests plans from, each [L, E]: its demand (the forecast's chance that any token
    needs the expert, mixed with the frequency estimate ``freq`` by each layer's ``accuracy``), the next step's
    (its requests' last tokens, mixed half and half with frequency) and the per-step frequency demand."""
    f = np.clip(freq, 0.0, 1.0)
    fstep = 1 - (1 - f) ** max(batch, 1)  # [L, E]
    if fc is None or fc.tokens == 0:
        pred = np.zeros_like(f)
        ends = np.zeros((0, *f.shape))
    else:
        pred = 1 - np.exp(fc.log_miss)  # [L, E]
        ends = fc.ends  # [B, L, E] each request's last token
    ftok = 1 - (1 - f) ** max(fc.tokens if fc is not None else 1, 1)
    a = accuracy[:, None]
    demand = a * pred + (1 - a) * ftok
    last = 1 - np.exp(np.log1p(-0.5 * (np.clip(ends, 0, 1 - 1e-6) + f[None])).sum(axis=0)) if len(ends) else f
    return demand, 0.5 * (last + fstep), fstep


def top_mask(probs: np.ndarray, k: int) -> np.ndarray:
    """[t, L, E] bool: the ``k`` likeliest experts of each token and layer of ``probs`` [t, L, E], the very set that
    ``np.argpartition(-probs, k - 1, axis=-1)[..., :k]`` picks. Where the k-th and (k+1)-th largest probabilities
    differ that set is every expert at least as likely as the k-th (found by a sort, several times faster than
    ``argpartition``); only rows with a tie there (or a NaN) are left to ``argpartition``, whose choice among the
    tied ones is its own (rows are partitioned one by one, so a row's pick does not depend on the others)."""
    num_experts = probs.shape[-1]
    if probs.strides[0] == 0:  # identical rows (frequencies): pick once
        return np.broadcast_to(_argpartition_mask(probs[0], k), probs.shape)
    if k >= num_experts:
        return np.ones(probs.shape, bool)
    flat = probs.reshape(-1, num_experts)
    ranked = np.sort(flat, axis=-1)  # ascending; NaN last
    kth = ranked[:, num_experts - k]
    mask = flat >= kth[:, None]
    unclear = np.flatnonzero((ranked[:, num_experts - k - 1] == kth) | np.isnan(ranked[:, -1]))
    if len(unclear):
        mask[unclear] = _argpartition_mask(flat[unclear], k)
    return mask.reshape(probs.shape)


def _argpartition_mask(probs: np.ndarray, k: int) -> np.ndarray:
    """[..., E] bool of ``np.argpartition(-probs, k - 1, axis=-1)[..., :k]``."""
    top = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    mask = np.zeros(probs.shape, bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return mask
