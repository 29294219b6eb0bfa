"""Recall of routing predictors by look-ahead distance, on recorded router inputs (``routing.hidden``): the hybrid
(``routing.hybrid``), its parts (ExpertFlow's path predictor, speculative gating) and the baselines (the previous
token's experts, popularity, MoE-Infinity's EAM match). Per token and layer, the share of the true top-k among the
predicted top-k, averaged over tokens and layers (all tokens, and decode tokens alone). A method that does not
depend on the distance (path, baselines) has the same figure at every distance. Gating guesses layer ``j`` from
layer ``j - d`` (the token's embedding for ``j - d = -1``); for ``j < d - 1`` it has no source and falls back
to popularity, and it has no figure before the step. The gate maps, the hybrid's weights, popularity and the EAM collection come from the
training record only.

Legend: n tokens of a request, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import numpy as np

from moeflow.routing import predictor_eval as pe
from moeflow.routing.hidden import HiddenRecord
from moeflow.routing.hybrid import BEFORE, Components, HybridWeights, distance_keys, fit_hybrid
from moeflow.routing.sequences import RequestSeq, prev_routing, request_sequences
from moeflow.routing.speculative import SpeculativeGate, first_layer, fit_gate

METHODS = ("hybrid", "path", "gate", "last_token", "popularity", "eam_match")


def _rows(rec: HiddenRecord) -> list[np.ndarray]:
    """Trace rows of each request in position order (``request_sequences``' order)."""
    t = rec.trace
    out = []
    for r in t.requests():
        idx = np.flatnonzero(t.request == r)
        out.append(idx[np.argsort(t.position[idx], kind="stable")])
    return out


def components(
    rec: HiddenRecord, gate: SpeculativeGate, path: pe.Scorer, pop: np.ndarray
) -> list[Components]:
    """Component scores of every request of ``rec`` (gate: ``top_k`` × softmax, so its scale is the others')."""
    k, num_layers = rec.trace.top_k, rec.trace.num_layers
    out = []
    for seq, rows in zip(request_sequences(rec.trace), _rows(rec)):
        g = {}
        for d in gate.distances:
            s = np.full((len(seq), num_layers, rec.trace.num_experts), np.nan, np.float32)
            for j in range(first_layer(d), num_layers):
                s[:, j] = k * gate.probs(rec.source(rows, j - d), j, d)
            g[d] = s
        out.append(Components(g, path(seq), prev_routing(seq, rec.trace.num_experts), pop))
    return out


def _report(scores: list[np.ndarray], seqs: list[RequestSeq], k: int) -> dict:
    hits = [pe.topk_hits(s, q.experts, k)[q.valid] for s, q in zip(scores, seqs)]
    dec = np.concatenate([q.decode[q.valid] for q in seqs])
    h = np.concatenate(hits).astype(np.float64) / k  # [N, L]
    return {"recall": float(h.mean()), "decode_recall": float(h[dec].mean()) if dec.any() else None,
            "tokens": len(h), "recall_per_layer": [round(float(x), 4) for x in h.mean(0)]}  # fmt: skip


def evaluate_lookahead(
    held: HiddenRecord, train: HiddenRecord, path: pe.Scorer, step: float = 0.1, fit_maps: bool = True
) -> tuple[dict, HybridWeights]:
    """{method: {"lookahead_<d>" | "before_step": {recall, decode_recall, ...} | None}} and the fitted weights."""
    k, ne = held.trace.top_k, held.trace.num_experts
    train_seqs, held_seqs = request_sequences(train.trace), request_sequences(held.trace)
    pop = pe.popularity(train_seqs, ne)
    gate = fit_gate(train, fit=fit_maps)
    train_comps = components(train, gate, path, pop)
    weights = fit_hybrid(train_comps, [s.experts for s in train_seqs], [s.valid for s in train_seqs], k, step)
    comps = components(held, gate, path, pop)
    eam = pe.eam_scorer(train_seqs, pop)
    fixed = {"path": [c.path for c in comps], "last_token": [pe.last_token_scorer(pop)(s) for s in held_seqs],
             "popularity": [pe.popularity_scorer(pop)(s) for s in held_seqs]}  # fmt: skip
    if eam is not None:
        fixed["eam_match"] = [eam(s) for s in held_seqs]
    results: dict[str, dict] = {m: {} for m in METHODS if m in fixed or m in ("hybrid", "gate")}
    for key in distance_keys():
        name = BEFORE if key == BEFORE else f"lookahead_{key}"
        results["hybrid"][name] = _report([weights.score(c, key) for c in comps], held_seqs, k)
        if key == BEFORE:
            results["gate"][name] = None
        else:
            gated = [np.where(np.isnan(c.gate[int(key)]), pop[None], c.gate[int(key)]) for c in comps]
            results["gate"][name] = _report(gated, held_seqs, k)
        for m, scores in fixed.items():
            results[m][name] = _report(scores, held_seqs, k)
    return results, weights
