"""ExpertFlow (arXiv 2410.17954) as a cache policy: a routing-path predictor drives per-layer prefetching and
eviction, corrected in real time by the routers' true choices.

Per step (``L`` layers, ``E`` experts, ``T`` tokens, ``B`` sequences):

* ``begin_step``: the predictor (``routing.predictor``; one GRU state per request) gives each token's expert
  probabilities [T, L, E]; the step's demand ``D[l, e] = 1 − Π_t (1 − p[t, l, e])`` is the chance that expert
  ``e`` of layer ``l`` is needed by any token. Without a predictor file the per-token probabilities are the
  experts' recent frequencies (and a warning says so once).
* Trust: each layer keeps a running accuracy (recall of the predicted top-k among the true top-k, per token).
  The demand used for planning mixes the prediction and the frequency estimate by that accuracy, and prefetching
  looks ``d`` layers ahead only while ``accuracy[l] ** d >= trust``.
* ``prefetch(l)``: for the trusted layers ahead, the likeliest experts (demand ≥ ``min_prob``), at most each
  layer's quota (the slots shared out among the look-ahead layers in proportion to predicted demand, Σ_e D),
  in order of need (nearer layer first, then likelier), within a per-step budget of copies
  (``prefetch_per_layer``); a prefetch only evicts a key expected to be needed later than itself.
* Eviction (``victim``): the key with the longest expected distance (in layers) to its next use:
  ``d1 + (1 − p1) · L / f`` with ``d1`` the layers until the key's layer comes round again, ``p1`` the chance it
  is used then (this step's demand for layers ahead; a next-step estimate for layers already finished, whose
  slots are thereby reused for later layers) and ``f`` its per-step frequency.
* Correction (``observe(l)``): misses are loaded at top priority by ``request``; prefetched experts of layer ``l``
  that the router did not choose are demoted (evicted before anything else); the layer's accuracy is updated.

The prefetch planning lives in ``policies.flow_prefetch``, the per-request predictor state in ``policies.forecast``,
the distance table and the victim ranking in ``policies.flow_rank``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moeflow.experts.cache import (
    CachePolicy,
    Key,
    Load,
    PolicyContext,
    StepInfo,
    StepRouting,
    register_policy,
)
from moeflow.experts.policies.flow_prefetch import Later, plan_prefetch
from moeflow.experts.policies.flow_rank import DEMOTED, distance_table, ranked_victims
from moeflow.experts.policies.flow_settle import settle_static
from moeflow.experts.policies.forecast import Forecaster, StepForecast, step_demand
from moeflow.experts.policies.link import LinkLedger
from moeflow.experts.policies.options import apply_options


@dataclass
class ExpertFlowPolicy(CachePolicy):
    max_lookahead: int = 2
    """Most layers ahead that ``prefetch`` plans for."""
    trust: float = 0.25
    """Look ``d`` layers ahead while ``accuracy ** d`` is at least this."""
    min_prob: float = 0.5
    """Prefetch experts at least this likely to be needed in this step."""
    prefetch_per_layer: float = 2.0
    """Prefetch budget: at most this many loads per layer on average in a step (0: no limit). Set it to the
    copies one layer's compute hides (layer time × bandwidth / expert bytes): beyond that a prefetch takes link
    time as a miss would, and pays only if it is used and displaces nothing needed."""
    auto_budget: bool = True
    """Set ``prefetch_per_layer`` from timing the engine measures (or the simulator models) via ``on_timing``:
    layer compute time / one expert's copy time (at least one copy per step). Off when the option is given."""
    byte_aware: bool = False
    """Issue a prefetch only if its expected benefit beats its displacement and link cost (``policies.link``; needs
    ``on_timing``): chance of use = the step's demand; the victim's = its demand if its layer is still ahead in the
    step, else the next-step estimate."""
    decay: float = 0.9
    """Running averages (accuracy, expert frequency) keep this much of the old value per step."""
    max_requests: int = 4096
    """Per-request predictor states kept (least recently used dropped)."""
    predictor: object | None = field(default=None, init=False)
    source: str = field(default="frequency", init=False)

    def __post_init__(self) -> None:
        self.name = "expertflow"
        self._ready, self._timed = False, False
        self.link = LinkLedger()

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_slots, num_layers, num_experts, top_k)
        shape = (num_layers, num_experts)
        self.freq = np.full(shape, top_k / max(num_experts, 1))  # [L, E] per-token share
        self.accuracy = np.full(num_layers, 0.5)  # [L]
        self.forecast = Forecaster(num_layers, num_experts, self.max_requests)
        self.forecast.predictor = self.predictor  # kept across a re-bind
        self._fc: StepForecast | None = None  # this step's forecast
        self._demand = np.zeros(shape)  # [L, E] trusted demand of this step
        self._next = np.zeros(shape)  # [L, E] next-step demand estimate
        self._fstep = np.zeros(shape)  # [L, E] per-step frequency demand
        self._pos = -1  # layer routed last in this step
        self._table: np.ndarray | None = None  # [L, E] expected distance at self._pos
        self._later: tuple[np.ndarray, np.ndarray] | None = None  # the terms ``distances`` adds to d1
        self._pending: set[Key] = set()
        self._prefetched = 0  # prefetch loads issued in this step
        self._demoted: set[Key] = set()
        self._demoted_at = np.zeros(shape, bool)  # [L, E] ``_demoted`` as a mask
        self._in_use: set[Key] = set()
        self._cut_hint = [float("nan")]  # speeds the victim ranking up (``ranking.first_by_distance``)

    def setup(self, context: PolicyContext) -> None:
        self._ready = True
        opts = context.options
        names = (
            "max_lookahead",
            "trust",
            "min_prob",
            "decay",
            "prefetch_per_layer",
            "auto_budget",
            "byte_aware",
        )
        if "prefetch_per_layer" in apply_options(self, opts, names):
            self.auto_budget = False
        source = self.forecast.load_predictor(opts.get("predictor"), context.model_dir, self.top_k)
        if source is not None:
            self.predictor, self.source = self.forecast.predictor, source

    def end_request(self, request_id: int) -> None:
        self.forecast.end(request_id)

    # ---------------------------------------------------------------------------------- hooks
    def begin_step(self, info: StepInfo) -> None:
        if not self._ready:
            self.setup(PolicyContext())
        self._fc = self.forecast.begin_step(info, self.freq, self.top_k)
        self._plan_step(len(info.request_ids))

    def _plan_step(self, batch: int) -> None:
        """Demand of this step and of the next, mixed with frequency by each layer's accuracy."""
        self._demand, self._next, self._fstep = step_demand(self._fc, self.freq, self.accuracy, batch)
        self._pos, self._table, self._in_use, self._prefetched, self._later = -1, None, set(), 0, None
        self.link.begin_step()

    def observe(self, layer: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """``experts`` [T, K] for the step's tokens, sequences concatenated in StepInfo order."""
        ex = np.ascontiguousarray(experts, np.int64)  # rows of a [T, L, K] array are strided: copy once
        if ex.size and ex.min() >= 0:  # every row valid (the usual case): no masks
            valid, ok = None, ex
        else:
            valid = (ex >= 0).all(axis=1)  # [T]
            ok = ex[valid]
        if len(ok):
            share = np.bincount(ok.ravel(), minlength=self.num_experts)[: self.num_experts] / len(ok)
            self.freq[layer] = self.decay * self.freq[layer] + (1 - self.decay) * share
        if self._fc is not None and self._fc.tokens == len(ex) and len(ok):
            self._correct(layer, ex, valid)
        if self._pending:
            chosen = set(ex.ravel().tolist())
            demote = [k for k in self._pending if k[0] == layer and k[1] not in chosen]
            if demote:
                self._demote(demote)
        self._pos, self._table, self._in_use = layer, None, set()

    def _demote(self, keys: list[Key]) -> None:
        """Pending prefetches that their layer's router did not choose: evicted first from now on (until used).
        They leave ``_pending`` (once demoted, noting them again would change nothing)."""
        self._demoted.update(keys)
        self._pending.difference_update(keys)
        layers, experts = zip(*keys)
        self._demoted_at[list(layers), list(experts)] = True

    def _correct(self, layer: int, ex: np.ndarray, valid: np.ndarray | None) -> None:
        """Update the layer's accuracy and each request's routing of its latest token (``valid``: the rows without
        -1, None: all)."""
        hits = self._fc.hits(layer, ex)  # type: ignore[union-attr]
        if valid is not None:
            hits = hits[valid]
        mean = int(hits.sum()) / len(hits)  # an exact integer sum: ``hits.mean()``
        self.accuracy[layer] = self.decay * float(self.accuracy[layer]) + (1 - self.decay) * mean / self.top_k
        self.forecast.record(layer, ex, valid is None)

    def on_timing(self, layer_s: float, copy_s: float) -> None:
        self.link.layer_s, self.link.copy_s = layer_s, copy_s
        if not self.auto_budget or copy_s <= 0 or self.num_layers == 0:
            return
        budget = max(layer_s / copy_s, 1.0 / self.num_layers)
        if self._timed:  # measured every step: smooth
            budget = self.decay * self.prefetch_per_layer + (1 - self.decay) * budget
        self.prefetch_per_layer, self._timed = budget, True

    def on_access(self, key: Key) -> None:
        self._in_use.add(key)
        self._pending.discard(key)
        if key in self._demoted:
            self._demoted.discard(key)
            self._demoted_at[key] = False

    def on_access_keys(self, keys: list[Key]) -> None:
        """``on_access`` of each of ``request``'s keys, at once (the victims were chosen before: ``_in_use`` is
        not read by them)."""
        self._in_use.update(keys)
        if self._pending:
            self._pending.difference_update(keys)
        if self._demoted and keys:
            self._demoted.difference_update(keys)
            self._demoted_at[keys[0][0], [k[1] for k in keys]] = False  # one layer's keys

    def end_step(self) -> None:
        self.forecast.end_step()

    def settle_step(self, routing: StepRouting) -> None:
        """A static step's routing arrives whole: ``observe`` and ``on_access`` of every layer in one pass
        (``policies.flow_settle``; the same values as layer by layer). A subclass with its own ``on_access`` goes
        layer by layer; one with its own ``observe`` extends ``_observe_rest`` alike."""
        if type(self).on_access is not ExpertFlowPolicy.on_access:
            super().settle_step(routing)
        else:
            settle_static(self, routing)

    def _observe_rest(self, experts: np.ndarray, valid: np.ndarray) -> None:
        """What a subclass's ``observe`` adds, for every layer of a static step at once: ``experts`` [L, T, K]
        int64, ``valid`` [L, T] its rows without -1."""

    # ------------------------------------------------------------------------------- planning
    def distances(self) -> np.ndarray:
        """[L, E] expected layers until each key is next used, seen from the layer routed last."""
        if self._table is None:
            self._table = distance_table(self)
        return self._table

    def slot_distances(self) -> np.ndarray:
        """[S] ``distances`` of each slot's key (of key (0, 0) for an empty slot), a new array."""
        # empty slots: < 0, clipped to key (0, 0)
        flat = self.slot_layer * self.num_experts + self.slot_expert
        return self.distances().take(flat, mode="clip")

    def _distance(self, key: Key) -> float:
        return float(self.distances()[key]) + (DEMOTED if key in self._demoted else 0.0)

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return max(candidates, key=lambda k: (self._distance(k), -self.last_use(k)))

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        """``victim``'s rule over every slot at once: longest expected distance, then least recently used."""
        if may_evict is not None and not isinstance(may_evict, Later):
            return super().select_victim(protect, layer, may_evict)
        chosen = self._ranked(1, protect, None if may_evict is None else may_evict.floor)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        return self._ranked(n, protect, None)

    def victims_for(self, n: int, keys: list[Key], found: list[int | None], layer: int) -> list[Key]:
        return self._ranked(n, set(), None, [s for s in found if s is not None])

    def _ranked(
        self, n: int, protect: set[Key], floor: float | None, held: list[int] | None = None
    ) -> list[Key]:
        """The ``n`` best victims (``policies.flow_rank``); the slots of ``protect`` (or the slots ``held``) blocked,
        only keys expected later than ``floor`` when given."""
        return ranked_victims(self, n, protect, floor, held)

    def horizon(self, layer: int, lookahead: int | None = None) -> list[int]:
        """Layers after ``layer`` (at most ``lookahead``, default ``max_lookahead``) whose predictions are trusted
        (see ``trust``)."""
        out = []
        ahead = self.max_lookahead if lookahead is None else lookahead
        for nxt in range(layer + 1, min(self.num_layers, layer + 1 + ahead)):
            if self.accuracy[nxt] ** (nxt - layer) < self.trust:
                break
            out.append(nxt)
        return out

    def quotas(self, layers: list[int]) -> dict[int, int]:
        """Slots for each look-ahead layer, in proportion to its predicted demand (expected distinct experts)."""
        need = self._demand[layers].sum(axis=1) if layers else np.zeros(0)
        total = max(float(need.sum()), 1e-9)
        return {ly: max(1, int(self.num_slots * n / total)) for ly, n in zip(layers, need)}

    def prefetch_next_step(self) -> list[Load]:
        """Static decode plans the coming step at once (nothing runs between its layers): every trusted layer."""
        return self.prefetch(-1, self.num_layers)

    def prefetch(self, layer: int, lookahead: int | None = None) -> list[Load]:
        """Loads for the trusted layers after ``layer``, nearest layer first, then likeliest expert first."""
        if self._fc is None:
            return []
        return plan_prefetch(self, layer, lookahead)


register_policy("expertflow", ExpertFlowPolicy)
