"""ExpertFlow with request-level reuse (``expertflow-reuse``): eviction by each running request's own expert
frequencies, and optional bypass of read-through fills that would evict something likelier to be reused.

ExpertFlow ranks victims by the expected layers until next use, ``d1 + (1 − p1) · L / f`` (``expertflow``), where
``f`` is a per-step frequency from a short running average over every request (it keeps 0.9 of the old value per
step: about ten tokens of memory). This policy keeps the formula and the routing predictor, and replaces the
frequencies by request-level estimates, which is what an offline optimum (Belady) exploits: a request keeps
returning to the experts it has used, prompt included.

* Per request ``r`` (``L`` layers, ``E`` experts): counts ``c_r[l, e]`` of its tokens routed to each expert
  (prompt and decode tokens; each multiplied by ``req_decay`` per token, 1: the whole request), over its ``n_r``
  tokens. Its per-token chance of using an expert is ``q_r = (c_r + prior · g) / (n_r + prior)``, ``g`` [L, E] the
  long-run per-token frequency over all requests (``req_prior`` pseudo-tokens of it).
* The step's frequency ``f = 1 − Π_r (1 − q_r)`` over its requests (one token each in decode); this step's demand
  mixes the predictor with ``1 − Π_r (1 − q_r)^{T_r}`` by each layer's accuracy, as ExpertFlow mixes it with its
  frequencies; the next step's chance ``1 − Π_r (1 − (w · p_r + (1 − w) · q_r))`` with ``p_r`` the predictor's
  probabilities for the request's latest token and ``w = next_weight``.
* Bypass (static decode only, ``bypass`` > 0): between steps a resident key is offered for a read-through fill only
  if its step frequency ``f`` is below ``bypass`` × the running mean of ``f`` over the keys that missed (measured
  as they missed). A miss whose expert would displace a key more likely to be reused is then read from host memory
  and not kept: it costs its bytes once either way (the kernel reads a miss zero-copy), and the better key stays.

Prefetching is ExpertFlow's (its options apply), off by default here (``min_prob`` 2). The defaults (``req_decay``
0.95, ``vacate`` 0.5, no bypass, no prefetch) are the fewest decode bytes of a grid on a training-split trace at
batch 1 (``benchmarks/sim_policy_gap.py``); at batch 8 the same grid chose ``bypass=1 vacate=0 req_prior=1``.
Pure NumPy bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeflow.experts import boundary
from moeflow.experts.cache import Boundary, Key, PolicyContext, StepInfo, StepRouting, register_policy
from moeflow.experts.policies.expertflow import ExpertFlowPolicy
from moeflow.experts.policies.flow_settle import layer_counts
from moeflow.experts.policies.options import apply_options
from moeflow.experts.policies.ranking import first_lexsorted


@dataclass
class RequestUse:
    """One request's routing so far."""

    counts: np.ndarray
    """[L, E] float64: its tokens routed to each expert (decayed by ``req_decay`` per token)."""
    tokens: float = 0.0
    """Its tokens counted (decayed alike)."""


@dataclass
class ReusePolicy(ExpertFlowPolicy):
    req_prior: float = 4.0
    """Pseudo-tokens of the long-run frequency in each request's estimate (how fast a new request's own counts
    take over)."""
    req_decay: float = 0.95
    """Each request's counts keep this much per token (1: every token of the request weighs the same)."""
    next_weight: float = 0.5
    """Weight of the predictor's latest-token probabilities in the next step's estimate (the rest: ``q_r``)."""
    bypass: float = 0.0
    """Static decode: offer a key for a fill only if its step frequency is below this × the mean over recent
    misses (0: off, every victim in order is offered, as ExpertFlow does)."""
    min_prob: float = 2.0
    """ExpertFlow's prefetch threshold; above 1 nothing is prefetched (misses are read zero-copy and filled)."""
    vacate: float = 0.5
    """Static decode: between steps, empty the best victims' slots, this × the recent misses per step of them
    (0: none). The device lets a miss of layer ``l`` claim only a free slot or a key of a layer that already ran
    (``claims``), so the misses of early layers find few slots to fill; an empty slot takes a miss of any layer."""
    uses: dict[int, RequestUse] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "expertflow-reuse"

    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_slots, num_layers, num_experts, top_k)
        self.uses = {}
        self._global = np.zeros((num_layers, num_experts))  # [L, E] tokens routed to each expert
        self._global_tokens = np.zeros(num_layers)  # [L]
        self._segments: list[tuple[RequestUse, int, int]] = []  # the step's requests and their token rows
        self._q = np.zeros((0, num_layers, num_experts))  # [B, L, E] per-token chance of each request
        self._miss_f: float | None = None  # running mean of the step frequency of missed keys

    def setup(self, context: PolicyContext) -> None:
        super().setup(context)
        apply_options(self, context.options, ("req_prior", "req_decay", "next_weight", "bypass", "vacate"))

    def end_request(self, request_id: int) -> None:
        super().end_request(request_id)
        self.uses.pop(request_id, None)

    # ------------------------------------------------------------------------------ estimates
    def long_run(self) -> np.ndarray:
        """[L, E] per-token frequency over every token seen (``top_k / E`` before any)."""
        prior = self.top_k / max(self.num_experts, 1)
        seen = self._global_tokens[:, None]
        return np.where(seen > 0, self._global / np.maximum(seen, 1), prior)

    def request_rates(self, request_ids: tuple[int, ...]) -> np.ndarray:
        """[B, L, E] each request's per-token chance of using each expert (module docstring's ``q_r``)."""
        g = self.long_run()
        out = np.empty((len(request_ids), self.num_layers, self.num_experts))
        for i, rid in enumerate(request_ids):
            use = self.uses.get(rid)
            if use is None:
                out[i] = g
            else:
                out[i] = (use.counts + self.req_prior * g) / (use.tokens + self.req_prior)
        return np.clip(out, 0.0, 1.0)

    # ---------------------------------------------------------------------------------- hooks
    def begin_step(self, info: StepInfo) -> None:
        if not self._ready:
            self.setup(PolicyContext())
        self._q = self.request_rates(info.request_ids)
        self._tokens = np.array([len(t) for t in info.token_ids], np.float64)  # [B]
        self._segments, start = [], 0
        for rid, toks in zip(info.request_ids, info.token_ids):
            use = self.uses.get(rid)
            if use is None:
                use = self.uses[rid] = RequestUse(np.zeros((self.num_layers, self.num_experts)))
            if self.req_decay < 1.0:
                keep = self.req_decay ** len(toks)
                use.counts *= keep
                use.tokens *= keep
            use.tokens += len(toks)
            self._segments.append((use, start, start + len(toks)))
            start += len(toks)
        super().begin_step(info)

    def _plan_step(self, batch: int) -> None:
        """ExpertFlow's demand estimates, with the request-level rates in place of its running frequencies."""
        super()._plan_step(batch)
        q = self._q  # [B, L, E]
        if len(q) == 0:
            return
        miss = np.log1p(-np.minimum(q, 1 - 1e-6))  # [B, L, E] log(1 - q_r)
        f = 1 - np.exp(miss.sum(axis=0))  # one token of each request
        ftok = 1 - np.exp((miss * self._tokens[:, None, None]).sum(axis=0))  # the step's tokens
        pred = np.zeros_like(f) if self._fc is None else 1 - np.exp(self._fc.log_miss)
        a = self.accuracy[:, None]
        self._demand = a * pred + (1 - a) * ftok
        ends = self._fc.ends if self._fc is not None else np.zeros(0)
        w = self.next_weight if len(ends) == len(q) else 0.0
        p_next = w * (np.clip(ends, 0, 1) if w else 0.0) + (1 - w) * q
        self._next = 1 - np.exp(np.log1p(-np.minimum(p_next, 1 - 1e-6)).sum(axis=0))
        self._fstep = f

    def observe(self, layer: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        super().observe(layer, experts, weights)
        ex = np.asarray(experts, np.int64)
        segs = self._segments
        if segs and len(ex) == segs[-1][2] and ex.size and ex.min() >= 0 and ex.max() < self.num_experts:
            # every row valid (the usual case): each request's counts from one bincount over (request, expert)
            owner = np.repeat(np.arange(len(segs)), [e - s for _, s, e in segs])  # [T] each row's request
            flat = (owner[:, None] * self.num_experts + ex).ravel()
            counts = np.bincount(flat, minlength=len(segs) * self.num_experts).reshape(len(segs), -1)
            for (use, _, _), row in zip(segs, counts):
                use.counts[layer] += row
            self._global[layer] += counts.sum(axis=0)  # integers: exact in any order
            self._global_tokens[layer] += len(ex)
            return
        for use, s, e in self._segments:
            rows = ex[s:e]
            ok = rows[(rows >= 0).all(axis=1)]
            if len(ok):
                counts = np.bincount(ok.ravel(), minlength=self.num_experts)[: self.num_experts]
                use.counts[layer] += counts
                self._global[layer] += counts
                self._global_tokens[layer] += len(ok)

    def _observe_rest(self, experts: np.ndarray, valid: np.ndarray) -> None:
        """``observe``'s counts for every layer of a static step at once (the same element-wise additions)."""
        for use, s, e in self._segments:
            ok = valid[:, s:e]  # [L, n]
            counts = layer_counts(experts[:, s:e], ok, self.num_experts)  # [L, E]
            use.counts += counts
            self._global += counts
            self._global_tokens += ok.sum(axis=1)

    # ------------------------------------------------------------------------ static decode
    def settle_step(self, routing: StepRouting) -> None:
        """As ExpertFlow; first notes the step frequency of the keys the device missed (for ``bypass``)."""
        missed = routing.served == 2  # [L, E]
        if missed.any() and self._fstep.shape == missed.shape:
            mean = float(self._fstep[missed].mean())
            self._miss_f = mean if self._miss_f is None else 0.8 * self._miss_f + 0.2 * mean
        super().settle_step(routing)

    def plan_boundary(self, batch: int) -> Boundary:
        """``boundary.plan`` (prefetches, then the fill candidates: free slots, then victims in order), with the
        best victims' slots emptied after the prefetches (``vacate``) and only keys below the bypass bound offered
        or emptied (every victim when ``bypass`` is 0)."""
        if self.vacate <= 0:
            self._offer_below = self._bypass_bound()
            try:
                return boundary.plan(self, batch)
            finally:
                self._offer_below = None
        loads = tuple(self.prefetch_next_step())
        self._offer_below = self._bypass_bound()
        try:
            n = self.fill_budget(batch)
            protect = {load.key for load in loads}
            empty = min(n, round(self.vacate * (self._miss_avg or 0.0))) - len(self._free)
            for key in self.select_victims(empty, protect, 0) if empty > 0 else []:
                self._free.append(self._vacate(key))
            free = self._free[::-1][:n]
            victims = self.select_victims(n - len(free), protect, 0) if n > len(free) else []
        finally:
            self._offer_below = None
        self._offered = free + [self.slot_of[key] for key in victims]
        resident = np.where(self.slot_layer >= 0, self.slot_layer * self.num_experts + self.slot_expert, -1)
        return Boundary(loads, tuple(self._offered), resident)

    def _bypass_bound(self) -> float | None:
        return self.bypass * self._miss_f if self.bypass > 0 and self._miss_f is not None else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        bound = getattr(self, "_offer_below", None)
        if bound is None:
            return super().select_victims(n, protect, layer)
        ok = self.slot_layer >= 0  # [S]
        lay, exp = np.maximum(self.slot_layer, 0), np.maximum(self.slot_expert, 0)
        ok &= self._fstep[lay, exp] < bound
        dist = self.distances()[lay, exp]  # [S]
        for key in self._demoted:
            if key in self.slot_of:
                dist[self.slot_of[key]] += 1e9
        for key in protect:
            if key in self.slot_of:
                ok[self.slot_of[key]] = False
        idx = np.flatnonzero(ok)
        return [self.key_in[s] for s in idx[first_lexsorted(-dist[idx], self.slot_used[idx], n)]]


register_policy("expertflow-reuse", ReusePolicy)
