"""ExpertFlow's routing-path predictor: the model, its NumPy runtime, and its file format.

Before a token's first MoE layer runs, the predictor gives the probability that each expert of each MoE layer
is among the token's top-k (a token's *routing path*, L×E). It sees what is known then: the token ids of the
request so far (a GRU carries the context, one state per request) and, when the previous token of the request
ran in an earlier step (decode), that token's true routing.

Shapes: ``T`` tokens, ``L`` MoE layers, ``E`` experts per layer, ``D`` embedding width, ``H`` GRU width,
``V`` kept vocabulary (token ids outside it share row 0).

``PredictorNet`` (torch) is what training fits; ``RoutingPredictor`` is the NumPy runtime the cache policy
and the scheduler call (no torch at run time); ``save_predictor`` / ``load_predictor`` write and read the
``.pt`` file (fp16 weights + config) that lives at ``<model_dir>/moeflow/predictor.pt`` by default.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moeflow.errors import MoeflowError

FORMAT = "moeflow-predictor/1"
DEFAULT_NAME = "moeflow/predictor.pt"


@dataclass
class PredictorConfig:
    num_layers: int
    num_experts: int
    top_k: int
    vocab_size: int
    """Rows of the embedding table: kept token ids + 1 (row 0 = any other id)."""
    emb_dim: int = 64
    hidden: int = 128
    use_prev_routing: bool = True
    use_context: bool = True
    """False: no GRU (the token's own embedding and the previous token's routing only)."""
    model: str = ""
    """Name of the model whose traces trained it."""


def default_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / DEFAULT_NAME


class PredictorNet(nn.Module):
    """Token embedding → GRU over the request's tokens; head([h_t, emb_t]) + proj(prev routing) → L×E logits."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        le = cfg.num_layers * cfg.num_experts
        self.emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.gru = nn.GRU(cfg.emb_dim, cfg.hidden, batch_first=True)
        self.mix = nn.Linear(cfg.hidden + cfg.emb_dim, cfg.hidden)
        self.prev = nn.Linear(le, cfg.hidden, bias=False)
        self.out = nn.Linear(cfg.hidden, le)

    def forward(
        self, ids: torch.Tensor, prev: torch.Tensor | None, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S] (remapped), prev [B, S, L*E] (zeros where unknown) → logits [B, S, L*E], h [1, B, H]."""
        x = self.emb(ids)  # [B, S, D]
        if self.cfg.use_context:
            h, hn = self.gru(x, h0)  # [B, S, H]
        else:
            h, hn = x.new_zeros(*x.shape[:2], self.cfg.hidden), h0
        z = self.mix(torch.cat([h, x], dim=-1))
        if prev is not None and self.cfg.use_prev_routing:
            z = z + self.prev(prev)
        return self.out(nn.functional.gelu(z, approximate="tanh")), hn


def remap_tokens(vocab: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Token ids [T] → embedding rows [T]: 1 + index in the sorted ``vocab``, or 0 for ids not kept."""
    t = np.asarray(token_ids, np.int64)
    if len(vocab) == 0:
        return np.zeros_like(t)
    i = np.minimum(np.searchsorted(vocab, t), len(vocab) - 1)
    return np.where(vocab[i] == t, i + 1, 0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


class RoutingPredictor:
    """NumPy runtime of a trained :class:`PredictorNet` (float32). Stateless: callers keep one GRU state per
    request (``init_state``) and pass it in."""

    def __init__(self, cfg: PredictorConfig, vocab: np.ndarray, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        self.vocab = np.asarray(vocab, np.int64)  # [V-1] sorted kept token ids
        w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        self.emb = w["emb.weight"]  # [V, D]
        self.w_ih, self.w_hh = w["gru.weight_ih_l0"].T.copy(), w["gru.weight_hh_l0"].T.copy()  # [D|H, 3H]
        self.b_ih, self.b_hh = w["gru.bias_ih_l0"], w["gru.bias_hh_l0"]  # [3H]
        self.w_mix, self.b_mix = w["mix.weight"].T.copy(), w["mix.bias"]  # [H+D, H]
        self.w_prev = w["prev.weight"].T.copy()  # [L*E, H]
        self.w_out, self.b_out = w["out.weight"].T.copy(), w["out.bias"]  # [H, L*E]

    @property
    def shape(self) -> tuple[int, int]:
        return self.cfg.num_layers, self.cfg.num_experts

    def remap(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids → embedding rows (0 for ids outside the kept vocabulary)."""
        return remap_tokens(self.vocab, token_ids)

    def init_state(self) -> np.ndarray:
        return np.zeros(self.cfg.hidden, np.float32)  # [H]

    def predict(
        self, token_ids: np.ndarray, state: np.ndarray, prev: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of one request that run in one step: ``token_ids`` [T], GRU ``state`` [H], ``prev`` [L, E]
        (multi-hot routing of the request's previous token, known only if it ran in an earlier step) →
        (probabilities [T, L, E], new state [H]). Only the first of the T tokens gets ``prev``."""
        mix, h = self.encode(token_ids, state, prev)
        return self.head(mix), h

    def encode(
        self, token_ids: np.ndarray, state: np.ndarray, prev: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``predict`` up to the output head: (pre-activation features [T, H], new state [H]); ``head`` of any
        rows of them gives those tokens' probabilities (so callers can take them a few tokens at a time)."""
        x = self.emb[self.remap(token_ids)]  # [T, D]
        gi = x @ self.w_ih + self.b_ih  # [T, 3H]
        hid = self.cfg.hidden
        hs = np.zeros((len(x), hid), np.float32)
        h = state.astype(np.float32)
        for t in range(len(x) if self.cfg.use_context else 0):  # the only sequential part: the GRU
            gh = h @ self.w_hh + self.b_hh
            r = _sigmoid(gi[t, :hid] + gh[:hid])
            z = _sigmoid(gi[t, hid : 2 * hid] + gh[hid : 2 * hid])
            n = np.tanh(gi[t, 2 * hid :] + r * gh[2 * hid :])
            h = (1.0 - z) * n + z * h
            hs[t] = h
        mix = np.concatenate([hs, x], axis=1) @ self.w_mix + self.b_mix  # [T, H]
        if prev is not None and self.cfg.use_prev_routing and len(x):
            mix[0] += prev.reshape(-1).astype(np.float32) @ self.w_prev
        return mix, h

    def head(self, mix: np.ndarray) -> np.ndarray:
        """Probabilities [t, L, E] from ``encode``'s features [t, H]."""
        logits = _gelu(mix) @ self.w_out + self.b_out  # [t, L*E]
        return _sigmoid(logits).reshape(len(mix), *self.shape)

    def request_path(self, token_ids: np.ndarray) -> np.ndarray:
        """Predicted per-token expert usage of a request from its prompt: mean over tokens [L, E]."""
        probs, _ = self.predict(np.asarray(token_ids), self.init_state())
        return probs.mean(axis=0) if len(probs) else np.zeros(self.shape, np.float32)


def time_per_token(pred: RoutingPredictor, tokens: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Microseconds per token of the NumPy runtime on this machine: decode (one token per call, with the
    previous token's routing) and prefill (all ``tokens`` [T] in one call). Best of ``repeats``."""
    import time

    prev = np.zeros(pred.shape, np.float32)
    prev[:, : pred.cfg.top_k] = 1.0
    best_dec = best_pre = float("inf")
    for _ in range(repeats):
        h, t0 = pred.init_state(), time.perf_counter()
        for t in tokens:
            _, h = pred.predict(np.asarray([t]), h, prev)
        best_dec = min(best_dec, (time.perf_counter() - t0) / len(tokens))
        t0 = time.perf_counter()
        pred.predict(np.asarray(tokens), pred.init_state())
        best_pre = min(best_pre, (time.perf_counter() - t0) / len(tokens))
    return {"decode_us_per_token": best_dec * 1e6, "prefill_us_per_token": best_pre * 1e6}


def save_predictor(
    path: str | os.PathLike, net: PredictorNet, vocab: np.ndarray, info: dict | None = None
) -> Path:
    """Write fp16 weights, the config and the kept vocabulary atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "config": asdict(net.cfg),
        "vocab": torch.as_tensor(np.asarray(vocab, np.int64)),
        "state": {k: v.detach().to("cpu", torch.float16) for k, v in net.state_dict().items()},
        "info": dict(info or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def _read(path: str | os.PathLike) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MoeflowError(
            f"predictor file {path} does not exist; train one with `moeflow predictor train`"
        ) from None
    except Exception as exc:
        raise MoeflowError(f"{path} is not a readable moeflow predictor: {exc}; retrain it") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise MoeflowError(f"{path} is not a {FORMAT} file; retrain it with `moeflow predictor train`")
    return blob


def load_predictor(path: str | os.PathLike) -> RoutingPredictor:
    """The NumPy runtime of a saved predictor."""
    blob = _read(path)
    state = {k: v.float().numpy() for k, v in blob["state"].items()}
    return RoutingPredictor(PredictorConfig(**blob["config"]), blob["vocab"].numpy(), state)


def load_net(path: str | os.PathLike) -> tuple[PredictorNet, np.ndarray, dict]:
    """The torch module of a saved predictor (for evaluation on a device), its vocabulary and info."""
    blob = _read(path)
    net = PredictorNet(PredictorConfig(**blob["config"]))
    net.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return net.eval(), blob["vocab"].numpy(), blob["info"]


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


def resolve_predictor(option: object, model_dir: str | os.PathLike | None) -> tuple[object | None, str]:
    """The predictor a policy should use, and where it came from: ``option`` may be a predictor object (tests,
    notebooks: anything with ``shape``, ``cfg.top_k``, ``init_state()`` and ``predict()``) or a path; without it,
    the one saved beside the model, if any. ``(None, "")`` when there is none."""
    if option is not None and not isinstance(option, (str, os.PathLike)):
        return option, "given predictor"
    path = option
    if path is None and model_dir:
        path = default_path(model_dir) if default_path(model_dir).exists() else None
    if path is None:
        return None, ""
    return load_predictor(path), str(path)
