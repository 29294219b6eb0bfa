"""MoE-Infinity (arXiv 2401.14361) as a cache policy: activation-aware prefetching and caching driven by the
running requests' Expert Activation Matrices matched against a collection of past ones (``routing.eam``).

Per MoE layer ``l`` of a step (``L`` layers): ``observe`` adds the routing to each running request's EAM (over
the whole sequence so far, as in the paper) and matches its rows ``0..l`` against the collection; the match is
the best entry's (or the top-``match_k`` entries' similarity-weighted) normalised rows. The predicted activation
ratio of a row blends the request's own ratios (weight ``history_weight``; rows it routed in earlier tokens)
with the match; rows the request has not routed yet are the match's alone. The own ratios mix the EAM's with
those of a recency-weighted copy (each step multiplies it by ``recency``; share ``recent_weight``), since a
request's next tokens route more like its latest ones than like its prompt as a whole.

* Prefetch (``prefetch(l)``): candidates are the experts of layers ``l+1..`` (never a layer already passed),
  priority = predicted ratio × (1 − (i − l)/L), the paper's layer-proximity decay; the highest first, at most
  ``max_prefetch`` loads per call and ``prefetch_per_layer`` × L per step (spread over the calls left), and a
  prefetch only displaces an expert whose keep-score is lower. ``prefetch(-1)``, before a step's first layer,
  does the same from layer 0 on for requests that routed earlier tokens (matched over all their rows).
* Cache (``victim``): keep-score = predicted ratio × (1 − i/L), the paper's bias toward early layers (they have
  the least time to be prefetched); for a layer still ahead in this step the score is at least its prefetch
  priority (it is about to be used). The lowest score is evicted; ties go to the least recently requested
  (LRU), which is also what remains when nothing is known.

The collection comes from ``options["eamc"]`` (an ``EAMCollection`` or a path) or ``<model_dir>/moeflow/eamc.npz``,
and grows online: a request's EAM is admitted when it ends (``end_request``, or ``finish``); ``finish`` saves it
to ``options["eamc_save"]`` when given (the file beside the model is never overwritten unless named there). The
running requests' activations and the collection's loading and saving live in ``policies.activations``, the
prefetch planning in ``policies.eam_prefetch``.

``variant=calibrated`` (option; also the policy name ``moe-infinity-calibrated``; tuned on training routing only,
BENCHMARKS.md issue 15): the step's summed ratios become chances of use, eviction drops the expert expected to be
needed last (Belady's rule on expectations, ``eam_scores.distance_keep``), prefetch takes only experts of the next
``lookahead`` layers whose chance is at least ``min_prob``, and the collection is matched once per step, at its
start (the step boundary), not after every layer: between layers only the new layer's row is updated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.experts.cache import CachePolicy, Key, Load, PolicyContext, StepInfo, register_policy
from moeflow.experts.plan import StepRouting
from moeflow.experts.policies.activations import (
    EAMC_FILE,
    RunningActivations,
    load_collection,
    save_collection,
)
from moeflow.experts.policies.eam_prefetch import plan_calibrated, plan_prefetch
from moeflow.experts.policies.eam_scores import UNMATCHED, BlendedRatios, CalibratedChances
from moeflow.experts.policies.link import LinkLedger
from moeflow.experts.policies.options import apply_options
from moeflow.experts.policies.ranking import first_lexsorted
from moeflow.routing.eam import DEFAULT_CAPACITY, EAMCollection
from moeflow.routing.eam_match import RequestEAM, best_match, predict_batch
from moeflow.routing.eam_match import match as match_eams
from moeflow.routing.eam_unit import UnitRequestEAM, match_unit

__all__ = ["EAMC_FILE", "MoEInfinityPolicy"]


@dataclass
class MoEInfinityPolicy(CachePolicy):
    capacity: int = DEFAULT_CAPACITY
    """EAM collection capacity (when it is created here rather than loaded)."""
    match_k: int = 1
    """Collection entries the prediction averages (1: the best match, as in the paper)."""
    max_prefetch: int = 0
    """Prefetch loads per ``prefetch`` call; 0: top_k × the step's sequences."""
    prefetch_enabled: bool = True
    history_weight: float = 0.75
    """Weight of the running requests' own activation ratios against the collection's prediction (per layer
    row the request has routed before; rows it has not are the collection's alone)."""
    predict_own: bool = True
    """Prefetch from that blend too (the request's own rows ahead, from its earlier tokens); off: from the
    collection's match alone (eviction still uses the blend)."""
    recency: float = 0.8
    """Per-step decay of a second, recency-weighted copy of each request's EAM (1: none)."""
    recent_weight: float = 0.5
    """Share of the recency-weighted copy in the request's own activation ratios."""
    prefetch_before: bool = True
    """Act on ``prefetch(-1)`` (before the step's first layer): prefetch from layer 0 on, matching the requests'
    EAMs from their earlier tokens over all layers."""
    byte_aware: bool = False
    """Issue a prefetch only if its expected benefit beats its displacement and link cost (``policies.link``; needs
    ``on_timing``). The chance of use of an expert is 1 − exp(−k · predicted ratio), summed over the requests."""
    prefetch_per_layer: float = 0.0
    """Prefetch budget, as ExpertFlow's: at most this many loads per layer on average in a step (0: no limit).
    Fewer copies for some hit ratio: e.g. the copies one layer's compute hides (layer time × bandwidth / bytes)."""
    variant: str = "paper"
    """"paper": the rules above; "calibrated": the module docstring's last paragraph (its options: ``calib``, the
    chance of use = 1 − exp(−calib · K · ratio); ``min_prob``; ``lookahead`` layers; ``per_request`` loads per call
    and request when ``max_prefetch`` is 0)."""
    calib: float = 1.1
    min_prob: float = 0.15
    lookahead: int = 1
    per_request: int = 2

    def __post_init__(self) -> None:
        self.name = "moe-infinity"
        self.eamc: EAMCollection | None = None
        self.save_path: Path | None = None
        self.link = LinkLedger()
        self._reset()

    def _reset(self) -> None:
        self.acts = RunningActivations(self.num_layers, self.num_experts)
        self._blends = BlendedRatios()
        self._prefetched = 0  # prefetch loads issued in this step
        self._rids: tuple[int, ...] = ()
        self._lengths: list[int] = []
        self._layer = -1
        self._pred: np.ndarray | None = None  # [L, E] predicted ratios, summed over the step's requests
        self._keep: np.ndarray | None = None  # [L, E] keep-scores at the current layer
        self._chances = CalibratedChances()  # variant=calibrated: chances of use and expected distances
        self._match: tuple[list, list] = ([], [])  # the step's matches (calibrated: made at its start)
        self._needed: set[Key] = set()
        self._needed_clock = -1
        self._settling = False
        """A static step is being settled: ``observe`` keeps each layer's routing, counted and scored once after."""
        self._settled: list[np.ndarray] = []

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_slots, num_layers, num_experts, top_k)
        self._reset()
        if self.eamc is None or (self.eamc.num_layers, self.eamc.num_experts) != (num_layers, num_experts):
            self.eamc = EAMCollection(num_layers, num_experts, self.capacity)

    def setup(self, context: PolicyContext) -> None:
        opts = context.options
        names = ("capacity", "match_k", "max_prefetch", "history_weight", "recency", "recent_weight", "calib",
                 "prefetch_per_layer", ("prefetch", "prefetch_enabled"), "predict_own", "prefetch_before",
                 "byte_aware", "variant", "min_prob", "lookahead", "per_request")  # fmt: skip
        apply_options(self, opts, names)
        if self.variant not in ("paper", "calibrated"):
            raise ValueError(f"moe-infinity variant {self.variant!r}: one of paper, calibrated")
        shape = (self.num_layers, self.num_experts)
        self.eamc = load_collection(opts.get("eamc"), context.model_dir, shape, self.capacity)
        if opts.get("eamc_save"):
            self.save_path = Path(opts["eamc_save"])

    @property
    def running(self) -> dict[int, RequestEAM]:
        """The running requests' EAMs."""
        return self.acts.eams

    def end_request(self, request_id: int) -> None:
        """A request finished: its EAM joins the collection at the start of the next step (``begin_step``), so
        that no admission lands between two layers' decisions."""
        self.acts.end(request_id)

    def finish(self) -> None:
        for rid in list(self.running):
            self.end_request(rid)
        self.acts.admit_finished(self.eamc)
        if self.save_path is not None and self.eamc is not None:
            save_collection(self.eamc, self.save_path)
        super().finish()

    # ---------------------------------------------------------------------------------- hooks
    def begin_step(self, info: StepInfo) -> None:
        self.acts.admit_finished(self.eamc)
        self.link.begin_step()
        self._rids = tuple(info.request_ids)
        self._lengths = [len(t) for t in info.token_ids]
        self.acts.eam_type = RequestEAM if self.match_k == 1 else UnitRequestEAM
        self.acts.begin_step(self._rids, self.recency, self.recent_weight)
        self._blends.invalidate()
        self._layer, self._pred, self._keep, self._prefetched = -1, None, None, 0
        self._chances.reset()
        self._needed = set()  # nothing is in use before the first layer
        self._match = ([None] * len(self._rids), [UNMATCHED] * len(self._rids))
        if (self.prefetch_before or self.variant == "calibrated") and self.acts.any_routed():
            self._update_scores(-1)  # ``prefetch(-1)``: layer 0 on from the requests' earlier tokens

    def observe(self, layer: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """``experts`` [T, K]: the step's tokens, sequences concatenated in StepInfo order."""
        if not self._rids:  # no StepInfo: one anonymous request
            self.begin_step(StepInfo(0, (-1,), ((0,) * len(experts),), (0,), False))
        self._layer = layer
        if self._settling:  # counted with the other layers' once the step is settled
            self._settled.append(experts)
            return
        self.acts.add(layer, experts, self._lengths)
        self._update_scores(layer)

    def settle_step(self, routing: StepRouting) -> None:
        """A static step's routing arrives whole, after the step: nothing is decided between its layers, so the
        scores are computed once, from every layer's routing, instead of after each layer (the blends from scratch:
        the same values as layer by layer)."""
        self._settling, self._settled = True, []
        try:
            super().settle_step(routing)
        finally:
            self._settling = False
        if self._settled:
            assert len(self._settled) == self.num_layers  # ``boundary.settle`` observes every layer, in order
            self.acts.add_layers(np.stack(self._settled), self._lengths)
            self._blends.invalidate()
            self._chances.reset()
            self._update_scores(self._layer)

    def _update_scores(self, layer: int) -> None:
        """Prediction and keep-scores [L, E] for the step's requests at ``layer`` (the blends kept incrementally by
        ``eam_scores``; the keep-score as ratio × its row's factor, the larger of the two decays: rounding is
        monotonic, so that equals the larger of the two products bit for bit)."""
        assert self.eamc is not None
        acts, eamc, n = self.acts, self.eamc, len(self._rids)
        calibrated = self.variant == "calibrated"
        preds: list[np.ndarray | None] = [None] * n
        keys: list[object] = [UNMATCHED] * n
        matched = acts.seen.any(axis=(1, 2)) if len(eamc) else np.zeros(n, bool)  # [B]
        if calibrated and layer >= 0:  # the step's matches, made at its start (deferred to the step boundary)
            preds, keys = self._match
        elif matched.any():
            upto = layer if layer >= 0 else self.num_layers - 1
            rows = np.flatnonzero(matched).tolist()
            eams = [acts.eams[self._rids[i]] for i in rows]
            if self.match_k == 1:
                for i, best in zip(rows, best_match(eamc, match_eams(eams, eamc, upto)).tolist()):
                    preds[i], keys[i] = eamc.unit_rows(best), best
            else:  # the similarities' values reach the prediction: the products they were recorded with
                for i, pred in zip(rows, predict_batch(eamc, match_unit(eams, eamc, upto), self.match_k)):
                    preds[i], keys[i] = pred, None
        if calibrated:
            self._match = (preds, keys)
        track = len(eamc) > 0 and not self.predict_own  # the matches' sum is the prediction
        self._blends.update(acts.own, acts.seen, preds, keys, layer, self.history_weight, track)
        ratio = self._blends.ratio
        assert ratio is not None
        if calibrated:
            self._pred, self._keep = ratio, self._chances.update(ratio, layer, self.top_k, self.calib)
            return
        depth = np.arange(self.num_layers)  # [L]
        fac = 1 - depth / self.num_layers
        if not len(eamc):
            self._pred, self._keep = None, ratio * fac[:, None]
        elif self.predict_own:
            soon = np.where(depth > layer, 1 - (depth - layer) / self.num_layers, 0.0)
            self._pred, self._keep = ratio, ratio * np.maximum(fac, soon)[:, None]
        else:
            match = self._blends.match
            soon = np.where(
                depth[:, None] > layer, match * (1 - (depth - layer) / self.num_layers)[:, None], 0.0
            )
            self._pred, self._keep = match, np.maximum(ratio * fac[:, None], soon)

    def keep_score(self, key: Key) -> float:
        return 0.0 if self._keep is None else float(self._keep[key])

    def on_access(self, key: Key) -> None:
        if self.clock != self._needed_clock:
            self._needed, self._needed_clock = set(), self.clock
        self._needed.add(key)

    def on_access_keys(self, keys: list[Key]) -> None:
        """``on_access`` of one ``request``'s keys at once (they share its clock: the set is theirs alone)."""
        self._needed, self._needed_clock = set(keys), self.clock

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: (self.keep_score(k), self.last_use(k)))

    def _slot_keep(self, protect: set[Key]) -> np.ndarray:
        """[S] keep-score of each slot's key; inf for empty slots and ``protect``-ed keys (not evictable)."""
        occupied = self.slot_layer >= 0
        keep = (
            np.zeros(self.num_slots)
            if self._keep is None
            else self._keep[np.maximum(self.slot_layer, 0), np.maximum(self.slot_expert, 0)]
        )
        keep = np.where(occupied, keep, np.inf)
        slot_of = self.slot_of
        held = [slot_of[k] for k in protect if k in slot_of]
        if held:
            keep[held] = np.inf
        return keep

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        """``victim``'s rule over every slot at once: lowest keep-score, then least recently requested."""
        if may_evict is not None:
            return super().select_victim(protect, layer, may_evict)
        chosen = self._ranked(1, protect, np.inf)
        return chosen[0] if chosen else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        return self._ranked(n, protect, np.inf)

    def _ranked(self, n: int, protect: set[Key], bound: float) -> list[Key]:
        """The ``n`` best victims with keep-score below ``bound``: lowest score, then least recently requested."""
        keep = self._slot_keep(protect)  # [S]
        idx = np.flatnonzero(keep < bound)
        return [self.key_in[s] for s in idx[first_lexsorted(keep[idx], self.slot_used[idx], n)]]

    def prefetch(self, layer: int) -> list[Load]:
        """Loads for layers ahead of ``layer``, highest priority first (see the module docstring)."""
        if (
            not self.prefetch_enabled
            or self._pred is None
            or layer != self._layer
            or layer >= self.num_layers - 1
        ):
            return []
        return plan_calibrated(self, layer) if self.variant == "calibrated" else plan_prefetch(self, layer)

    def on_timing(self, layer_s: float, copy_s: float) -> None:
        self.link.layer_s, self.link.copy_s = layer_s, copy_s


register_policy("moe-infinity", MoEInfinityPolicy)
register_policy("moe-infinity-calibrated", lambda: MoEInfinityPolicy(variant="calibrated"))
