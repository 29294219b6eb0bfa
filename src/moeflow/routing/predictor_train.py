"""Training of the routing-path predictor (its evaluation and baselines are in ``predictor_eval``).

Traces become per-request sequences (rows sorted by position). Training fits :class:`PredictorNet` with a
multi-label (binary cross-entropy) loss against the true L×E routing, on windows of each request with a burn-in
of preceding tokens, with a validation split *by request* and early stopping on validation recall.

Shapes: ``n`` tokens of a request, ``L`` layers, ``E`` experts, ``K`` top-k, ``M`` predicted set size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from moeflow.errors import MoeflowError
from moeflow.routing.predictor import PredictorConfig, PredictorNet, remap_tokens
from moeflow.routing.predictor_eval import evaluate, net_scorer, popularity
from moeflow.routing.sequences import (
    RequestSeq,
    build_vocab,
    load_sequences,
    multi_hot,
    prev_routing,
    split_requests,
)
from moeflow.routing.trace import Trace


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
