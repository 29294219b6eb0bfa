"""Evaluation of the routing-path predictor against its baselines.

Per token and per layer: of the true top-k experts, how many are among the predicted top-m (recall = hits / k,
precision = hits / m; equal when m = k), averaged over tokens, never pooled over a batch. Baselines: the previous
token's experts (when known before the token runs, else popularity), global popularity from the training traces,
and MoE-Infinity's EAM match.

Shapes: ``n`` tokens of a request, ``L`` layers, ``E`` experts, ``K`` top-k, ``M`` predicted set size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from moeflow.errors import MoeflowError
from moeflow.routing.predictor import PredictorNet, remap_tokens
from moeflow.routing.sequences import RequestSeq, multi_hot, prev_routing

Scorer = Callable[[RequestSeq], np.ndarray]
"""A request → scores [n, L, E] (higher = more likely chosen), using only what is known before each token."""


def net_scorer(net: PredictorNet, vocab: np.ndarray) -> Scorer:
    """Run the whole request through the net at once (the GRU carries context as the runtime does)."""
    ne, nl = net.cfg.num_experts, net.cfg.num_layers
    device = next(net.parameters()).device

    @torch.no_grad()
    def score(seq: RequestSeq) -> np.ndarray:
        net.eval()
        ids = torch.from_numpy(remap_tokens(vocab, seq.tokens))[None].to(device)
        prev = torch.from_numpy(prev_routing(seq, ne).reshape(1, len(seq), -1)).to(device)
        logits, _ = net(ids, prev)
        return torch.sigmoid(logits[0]).float().cpu().numpy().reshape(len(seq), nl, ne)

    return score


def popularity(seqs: list[RequestSeq], num_experts: int) -> np.ndarray:
    """Per-layer share of tokens routed to each expert [L, E]."""
    tot = sum(multi_hot(s.experts[s.valid], num_experts).sum(0) for s in seqs)
    return tot / max(1, sum(int(s.valid.sum()) for s in seqs))


def popularity_scorer(pop: np.ndarray) -> Scorer:
    return lambda seq: np.broadcast_to(pop, (len(seq), *pop.shape))


def last_token_scorer(pop: np.ndarray) -> Scorer:
    """Previous token's experts where known before the token ran; popularity breaks ties and fills the rest."""
    return lambda seq: prev_routing(seq, pop.shape[1]) + 1e-3 * pop[None]


def eam_scorer(train: list[RequestSeq], pop: np.ndarray) -> Scorer | None:
    """MoE-Infinity's EAM match as a per-token predictor: the request's EAM over the tokens of earlier steps
    is matched (cosine, all layers) against a collection of the training requests' EAMs, and the best entry's
    activation ratios score the token (popularity before anything of the request has run). None when
    ``moeflow.routing.eam`` is not available."""
    try:
        from moeflow.routing.eam import EAMCollection, eam_from_experts
    except ImportError:
        return None
    num_layers, num_experts = pop.shape
    eamc = EAMCollection(num_layers, num_experts)
    eamc.extend(eam_from_experts(s.experts[s.valid], num_experts) for s in train)

    def score(seq: RequestSeq) -> np.ndarray:
        out = np.empty((len(seq), num_layers, num_experts))
        counts = np.zeros((num_layers, num_experts))  # [L, E] EAM of the steps run so far
        for st in np.unique(seq.step):
            rows = np.flatnonzero(seq.step == st)
            pred = eamc.predict(eamc.similarity(counts, num_layers - 1)) if counts.any() else None
            out[rows] = (pop if pred is None else pred) + 1e-3 * pop
            counts += eam_from_experts(seq.experts[rows][seq.valid[rows]], num_experts)
        return out

    return score


# --------------------------------------------------------------------------------------------- metrics


def topk_hits(scores: np.ndarray, experts: np.ndarray, m: int) -> np.ndarray:
    """How many of each token's true experts are among its ``m`` top-scored ones: [n, L] from [n, L, E], [n, L, K]."""
    top = np.argpartition(-scores, m - 1, axis=-1)[..., :m]  # [n, L, M]
    return (top[..., :, None] == experts[..., None, :]).any(-2).sum(-1)


def evaluate(scorer: Scorer, seqs: list[RequestSeq], k: int, m: int | None = None) -> dict:
    """Per-token recall and precision of the true top-k among the predicted top-m, per layer and overall, for
    all tokens, prefill tokens and decode tokens."""
    m = m or k
    hits, dec = [], []
    for seq in seqs:
        if not seq.valid.any():
            continue
        h = topk_hits(scorer(seq), seq.experts, m)
        hits.append(h[seq.valid])
        dec.append(seq.decode[seq.valid])
    if not hits:
        raise MoeflowError("no fully recorded tokens to evaluate on")
    allh, alld = np.concatenate(hits).astype(np.float64), np.concatenate(dec)
    out = {"k": k, "m": m}
    for name, sel in (("overall", slice(None)), ("prefill", ~alld), ("decode", alld)):
        h = allh[sel]
        if len(h) == 0:
            continue
        per_layer = h.mean(0)
        out[name] = {
            "tokens": len(h),
            "recall": float(per_layer.mean() / k),
            "precision": float(per_layer.mean() / m),
            "recall_per_layer": [round(float(x) / k, 4) for x in per_layer],
            "precision_per_layer": [round(float(x) / m, 4) for x in per_layer],
        }
    return out


def baselines(train: list[RequestSeq], pop: np.ndarray) -> tuple[dict[str, Scorer], list[str]]:
    """The baseline scorers ({name: scorer}) and notes on any left out."""
    out = {"last-token": last_token_scorer(pop), "popularity": popularity_scorer(pop)}
    notes = []
    eam = eam_scorer(train, pop) if train else None
    if eam is not None:
        out["eam-match"] = eam
    else:
        notes.append(
            "eam-match left out: " + ("no training traces given" if not train else "no moeflow.routing.eam")
        )
    return out, notes


def compare(
    scorers: dict[str, Scorer], seqs: list[RequestSeq], k: int, sizes: Sequence[int] | None = None
) -> dict[str, dict[str, dict]]:
    """``evaluate`` for each scorer and each predicted-set size (default k and 2k): {name: {"top{m}": ...}}."""
    sizes = sizes or (k, 2 * k)
    return {name: {f"top{m}": evaluate(fn, seqs, k, m) for m in sizes} for name, fn in scorers.items()}
