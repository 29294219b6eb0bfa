"""Recall of routing predictors by look-ahead distance, on recorded router inputs (``routing.hidden``): the hybrid
(``routing.hybrid``), its parts (ExpertFlow's path predictor, a gate) and the baselines (the previous token's
experts, popularity, MoE-Infinity's EAM match). Per token and layer, the share of the true top-k among the
predicted top-k, averaged over tokens and layers (all tokens, and decode tokens alone). A method that does not
depend on the distance (path, baselines) has the same figure at every distance.

Two gates guess layer ``j`` from layer ``j - d`` (the token's embedding for ``j - d = -1``): ``gate``, the logit
gate (``routing.logit_gate``), and ``gate_residual``, the residual gate (``routing.speculative``) alone; for
``j < d - 1`` they have no source and fall back to popularity, and they have no figure before the step. The
hybrid is built on the one named by ``gate`` (``"logit"`` or ``"residual"``); its weights are chosen on the
training record's gate scores: the logit gate's out-of-fold ones, the residual gate's in-sample ones. Everything
fitted (gates, hybrid weights, popularity, the EAM collection) comes from the training record only.

Legend: N tokens of a record, n tokens of a request, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow.routing import predictor_eval as pe
from moeflow.routing.hidden import HiddenRecord
from moeflow.routing.hybrid import BEFORE, LOOKAHEADS, Components, HybridWeights, distance_keys, fit_hybrid
from moeflow.routing.logit_gate import fit_logit_gate
from moeflow.routing.sequences import RequestSeq, prev_routing, request_sequences
from moeflow.routing.speculative import SpeculativeGate, first_layer, fit_gate

METHODS = ("hybrid", "path", "gate", "gate_residual", "last_token", "popularity", "eam_match")
GATES = ("logit", "residual")


def _rows(rec: HiddenRecord) -> list[np.ndarray]:
    """Trace rows of each request in position order (``request_sequences``' order)."""
    t = rec.trace
    out = []
    for r in t.requests():
        idx = np.flatnonzero(t.request == r)
        out.append(idx[np.argsort(t.position[idx], kind="stable")])
    return out


def residual_logits(rec: HiddenRecord, gate: SpeculativeGate, distance: int) -> np.ndarray:
    """[N, L, E] the residual gate's logits for every row of ``rec`` (NaN for layers with no source)."""
    t = rec.trace
    out = np.full((t.num_tokens, t.num_layers, t.num_experts), np.nan, np.float32)
    for j in range(first_layer(distance), t.num_layers):
        out[:, j] = gate.logits(rec.source(slice(None), j - distance), j, distance)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def components(
    rec: HiddenRecord, gate_logits: dict[int, np.ndarray], path: pe.Scorer, pop: np.ndarray
) -> list[Components]:
    """Component scores of every request of ``rec`` from the gate's logits [N, L, E] per distance (gate:
    ``top_k`` × softmax, so its scale is the others')."""
    k = rec.trace.top_k
    out = []
    for seq, rows in zip(request_sequences(rec.trace), _rows(rec)):
        g = {d: k * _softmax(z[rows]) for d, z in gate_logits.items()}  # NaN rows stay NaN
        out.append(Components(g, path(seq), prev_routing(seq, rec.trace.num_experts), pop))
    return out


def _report(scores: list[np.ndarray], seqs: list[RequestSeq], k: int) -> dict:
    hits = [pe.topk_hits(s, q.experts, k)[q.valid] for s, q in zip(scores, seqs)]
    dec = np.concatenate([q.decode[q.valid] for q in seqs])
    h = np.concatenate(hits).astype(np.float64) / k  # [N, L]
    return {"recall": float(h.mean()), "decode_recall": float(h[dec].mean()) if dec.any() else None,
            "tokens": len(h), "recall_per_layer": [round(float(x), 4) for x in h.mean(0)]}  # fmt: skip


def _gated(logits: np.ndarray, rec: HiddenRecord, pop: np.ndarray) -> list[np.ndarray]:
    """Per request, the gate's logits with popularity where it has no source."""
    return [np.where(np.isnan(logits[rows]), pop[None], logits[rows]) for rows in _rows(rec)]


@dataclass(frozen=True)
class Fitted:
    """What ``fit_on`` fits on a training record and applies to a held-out one."""

    weights: HybridWeights
    comps: list[Components]
    """Per held-out request (``request_sequences`` order), its component scores."""
    pop: np.ndarray
    logits: dict[int, np.ndarray]
    """Distance -> the chosen gate's logits [N, L, E] on the held-out record."""
    residual: dict[int, np.ndarray]
    """Distance -> the residual gate's logits [N, L, E] on the held-out record."""
    info: dict


def fit_on(held: HiddenRecord, train: HiddenRecord, path: pe.Scorer, step: float = 0.1,
           gate: str = "logit") -> Fitted:  # fmt: skip
    """Fit the gates, popularity and the hybrid's weights on ``train`` (nothing from ``held``), and score ``held``."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, not {gate!r}")
    k, ne = held.trace.top_k, held.trace.num_experts
    train_seqs = request_sequences(train.trace)
    pop = pe.popularity(train_seqs, ne)
    resid = fit_gate(train, LOOKAHEADS)
    held_resid = {d: residual_logits(held, resid, d) for d in LOOKAHEADS}
    info: dict = {"gate": gate}
    if gate == "logit":
        lg, train_logits = fit_logit_gate(train, LOOKAHEADS)
        held_logits = {d: lg.record_logits(held, d) for d in LOOKAHEADS}
        info["strengths"] = {str(d): s for d, s in lg.strengths.items()}
        info["rank"] = int(lg.features.basis.shape[2])
    else:
        train_logits = {d: residual_logits(train, resid, d) for d in LOOKAHEADS}
        held_logits = held_resid
    train_comps = components(train, train_logits, path, pop)
    weights = fit_hybrid(train_comps, [s.experts for s in train_seqs], [s.valid for s in train_seqs], k, step)
    return Fitted(weights, components(held, held_logits, path, pop), pop, held_logits, held_resid, info)


def hybrid_forecast(fit: Fitted, held: HiddenRecord, distance: int) -> np.ndarray:
    """[N, L, E] the hybrid's scores at look-ahead ``distance`` for every row of ``held`` (its trace's row order):
    what ``sim.simulate(forecast=...)`` replays."""
    t = held.trace
    out = np.zeros((t.num_tokens, t.num_layers, t.num_experts), np.float32)
    for comp, rows in zip(fit.comps, _rows(held)):
        out[rows] = fit.weights.score(comp, distance)
    return out


def evaluate_lookahead(
    held: HiddenRecord, train: HiddenRecord, path: pe.Scorer, step: float = 0.1, gate: str = "logit"
) -> tuple[dict, HybridWeights, dict]:
    """{method: {"lookahead_<d>" | "before_step": {recall, decode_recall, ...} | None}}, the hybrid's weights
    and what was fitted for the gate ({"gate": ..., "strengths": {d: per layer}} for the logit gate)."""
    k = held.trace.top_k
    fit = fit_on(held, train, path, step, gate)
    weights, comps, pop, info = fit.weights, fit.comps, fit.pop, fit.info
    held_logits, held_resid = fit.logits, fit.residual
    train_seqs, held_seqs = request_sequences(train.trace), request_sequences(held.trace)
    eam = pe.eam_scorer(train_seqs, pop)
    fixed = {"path": [c.path for c in comps], "last_token": [pe.last_token_scorer(pop)(s) for s in held_seqs],
             "popularity": [pe.popularity_scorer(pop)(s) for s in held_seqs]}  # fmt: skip
    if eam is not None:
        fixed["eam_match"] = [eam(s) for s in held_seqs]
    gates = {"gate": held_logits, "gate_residual": held_resid} if gate == "logit" else {"gate": held_resid}
    results: dict[str, dict] = {m: {} for m in METHODS if m in fixed or m in gates or m == "hybrid"}
    for key in distance_keys():
        name = BEFORE if key == BEFORE else f"lookahead_{key}"
        results["hybrid"][name] = _report([weights.score(c, key) for c in comps], held_seqs, k)
        for m, logits in gates.items():
            results[m][name] = (
                None if key == BEFORE else _report(_gated(logits[int(key)], held, pop), held_seqs, k)
            )
        for m, scores in fixed.items():
            results[m][name] = _report(scores, held_seqs, k)
    return results, weights, info
