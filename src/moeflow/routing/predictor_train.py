"""Training and evaluation of the routing-path predictor, and the baselines it is judged against.

Traces become per-request sequences (rows sorted by position). Training fits :class:`PredictorNet` with a
multi-label (binary cross-entropy) loss against the true L×E routing, on windows of each request with a burn-in
of preceding tokens, with a validation split *by request* and early stopping on validation recall.

Evaluation is per token and per layer: of the true top-k experts, how many are among the predicted top-m
(recall = hits / k, precision = hits / m; equal when m = k), averaged over tokens, never pooled over a batch.
Baselines: the previous token's experts (when known before the token runs, else popularity), global
popularity from the training traces, and MoE-Infinity's EAM match when ``moeflow.routing.eam`` provides it.

Shapes: ``n`` tokens of a request, ``L`` layers, ``E`` experts, ``K`` top-k, ``M`` predicted set size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from moeflow.errors import MoeflowError
from moeflow.routing.predictor import PredictorConfig, PredictorNet, remap_tokens
from moeflow.routing.trace import Trace


@dataclass
class RequestSeq:
    """One request's tokens in position order."""

    tokens: np.ndarray  # [n] token ids
    experts: np.ndarray  # [n, L, K] (-1 = not recorded)
    known: np.ndarray  # [n] bool: the previous token's routing was known before this token ran
    decode: np.ndarray  # [n] bool
    valid: np.ndarray  # [n] bool: every layer recorded
    step: np.ndarray  # [n] engine step each token ran in

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class TrainConfig:
    emb_dim: int = 64
    hidden: int = 128
    max_vocab: int = 8192
    use_prev_routing: bool = True
    use_context: bool = True
    window: int = 64
    burn_in: int = 16
    batch: int = 16
    lr: float = 3e-3
    max_epochs: int = 150
    patience: int = 6
    val_frac: float = 0.15
    seed: int = 0
    device: str = "cpu"


def request_sequences(trace: Trace) -> list[RequestSeq]:
    """Split a trace into per-request sequences, each sorted by position."""
    seqs = []
    for r in trace.requests():
        idx = np.flatnonzero(trace.request == r)
        idx = idx[np.argsort(trace.position[idx], kind="stable")]
        ex = trace.experts[idx]
        valid = (ex >= 0).all(axis=(1, 2))
        step = trace.step[idx]
        known = np.zeros(len(idx), bool)
        known[1:] = (step[:-1] < step[1:]) & valid[:-1]
        seqs.append(RequestSeq(trace.token[idx], ex, known, trace.decode[idx].astype(bool), valid, step))
    return seqs


def load_sequences(traces: Sequence[Trace]) -> tuple[list[RequestSeq], tuple[int, int, int]]:
    """All requests of several traces of one model shape; returns (sequences, (L, E, K))."""
    if not traces:
        raise MoeflowError("no traces given; record some with `moeflow trace`")
    shape = (traces[0].num_layers, traces[0].num_experts, traces[0].top_k)
    for t in traces[1:]:
        if (t.num_layers, t.num_experts, t.top_k) != shape:
            raise MoeflowError(
                f"traces have different shapes (L, E, K): {shape} and {(t.num_layers, t.num_experts, t.top_k)}; "
                "train one predictor per model"
            )
    return [s for t in traces for s in request_sequences(t)], shape


def split_requests(
    seqs: list[RequestSeq], frac: float, seed: int
) -> tuple[list[RequestSeq], list[RequestSeq]]:
    """(rest, held-out) with about ``frac`` of the requests held out (at least one each when possible)."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_held = min(max(1, round(frac * len(seqs))), len(seqs) - 1) if len(seqs) > 1 else 0
    held = {int(i) for i in order[:n_held]}
    return [s for i, s in enumerate(seqs) if i not in held], [s for i, s in enumerate(seqs) if i in held]


def build_vocab(seqs: list[RequestSeq], max_vocab: int) -> np.ndarray:
    """The ``max_vocab`` most frequent token ids, sorted."""
    ids, counts = np.unique(np.concatenate([s.tokens for s in seqs]), return_counts=True)
    keep = ids[np.argsort(-counts, kind="stable")[:max_vocab]]
    return np.sort(keep[keep >= 0])


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., L, K] expert ids (-1 ignored) → [..., L, E] float32 0/1."""
    out = np.zeros((*experts.shape[:-1], num_experts + 1), np.float32)
    np.put_along_axis(out, np.where(experts < 0, num_experts, experts), 1.0, axis=-1)
    return out[..., :num_experts]


def prev_routing(seq: RequestSeq, num_experts: int) -> np.ndarray:
    """[n, L, E]: the previous token's routing where it was known before the token ran, else zeros."""
    hot = multi_hot(seq.experts, num_experts)
    prev = np.zeros_like(hot)
    prev[1:] = hot[:-1] * seq.known[1:, None, None]
    return prev


def _windows(seqs: list[RequestSeq], window: int) -> list[tuple[int, int]]:
    return [(i, s) for i, seq in enumerate(seqs) for s in range(0, len(seq), window)]


def _collate(seqs, wins, vocab, num_experts, cfg: TrainConfig):
    """Padded batch: ids [B, S], prev [B, S, L*E], target [B, S, L*E], mask [B, S] (loss positions)."""
    parts = []
    for i, s in wins:
        seq = seqs[i]
        a, b = max(0, s - cfg.burn_in), min(len(seq), s + cfg.window)
        hot = multi_hot(seq.experts[a:b], num_experts)
        prev = prev_routing(seq, num_experts)[a:b]
        mask = seq.valid[a:b] & (np.arange(a, b) >= s)
        parts.append((remap_tokens(vocab, seq.tokens[a:b]), prev, hot, mask))
    size = max(len(p[0]) for p in parts)
    le = parts[0][1].shape[1] * num_experts
    ids = np.zeros((len(parts), size), np.int64)
    prev = np.zeros((len(parts), size, le), np.float32)
    target = np.zeros((len(parts), size, le), np.float32)
    mask = np.zeros((len(parts), size), bool)
    for j, (x, p, t, m) in enumerate(parts):
        ids[j, : len(x)], prev[j, : len(x)], target[j, : len(x)], mask[j, : len(x)] = (
            x,
            p.reshape(len(x), -1),
            t.reshape(len(x), -1),
            m,
        )
    dev = cfg.device
    return (torch.from_numpy(a).to(dev) for a in (ids, prev, target, mask))


def train_predictor(
    traces: Sequence[Trace], cfg: TrainConfig | None = None, progress: bool = True
) -> tuple[PredictorNet, np.ndarray, dict]:
    """Fit a predictor on ``traces``; returns (net with the best validation weights, vocabulary, info)."""
    seqs, shape = load_sequences(traces)
    return train_on_sequences(seqs, shape, cfg, progress, model=traces[0].model)


def train_on_sequences(
    seqs: list[RequestSeq],
    shape: tuple[int, int, int],
    cfg: TrainConfig | None = None,
    progress: bool = True,
    model: str = "",
) -> tuple[PredictorNet, np.ndarray, dict]:
    """``train_predictor`` on request sequences of routing shape (L, E, K)."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    nl, ne, k = shape
    train, val = split_requests(seqs, cfg.val_frac, cfg.seed)
    if not train or not val:
        raise MoeflowError("training needs traces of at least two requests (one is held out for validation)")
    vocab = build_vocab(train, cfg.max_vocab)
    pcfg = PredictorConfig(
        nl, ne, k, len(vocab) + 1, cfg.emb_dim, cfg.hidden, cfg.use_prev_routing, cfg.use_context, model
    )
    net = PredictorNet(pcfg).to(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    wins = _windows(train, cfg.window)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, bad, history = -1.0, copy.deepcopy(net.state_dict()), 0, []
    n_batches = -(-len(wins) // cfg.batch)
    bar = tqdm(total=cfg.max_epochs * n_batches, desc="predictor", unit="batch", disable=not progress)
    for epoch in range(cfg.max_epochs):
        net.train()
        order = rng.permutation(len(wins))
        total = 0.0
        for b in range(n_batches):
            ids, prev, target, mask = _collate(
                train, [wins[j] for j in order[b * cfg.batch : (b + 1) * cfg.batch]], vocab, ne, cfg
            )
            logits, _ = net(ids, prev)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (loss.mean(-1) * mask).sum() / mask.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            total += loss.item()
            bar.update(1)
        score = evaluate(net_scorer(net, vocab), val, k)["overall"]["recall"]
        history.append({"epoch": epoch, "loss": total / n_batches, "val_recall": score})
        bar.set_postfix(loss=f"{total / n_batches:.4f}", val_recall=f"{score:.4f}")
        if score > best + 1e-4:
            best, best_state, bad = score, copy.deepcopy(net.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    net.load_state_dict(best_state)
    info = {
        "val_recall": best,
        "epochs": len(history),
        "history": history,
        "train_requests": len(train),
        "val_requests": len(val),
        "train_tokens": int(sum(len(s) for s in train)),
        "params": int(sum(p.numel() for p in net.parameters())),
        "popularity": np.round(popularity(train, ne), 5).tolist(),
    }
    return net.eval(), vocab, info


# --------------------------------------------------------------------------------------------- scoring

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
