"""Decision logs at OLMoE's shape (16 layers x 64 experts, top-8) over long prefills: prompts of 2048, 600, 300 and
40 tokens (several of the forecast's 256-token chunks, and ragged ends), then decode, with skewed routing. The
predictors: a random one of the model's shape, a saturated one (many probabilities exactly 1.0 in float32, so the
top-k of a token has ties at its boundary), and none (expert frequencies, identical rows). What
``test_prefill_decisions`` holds ExpertFlow and MoE-Infinity to; ``python -m tests.experts.policies.prefill_log OUT``
writes the log of the code on ``PYTHONPATH`` (run it on the commit a speed-up starts from)."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from moeflow.experts.cache import CachePolicy
from moeflow.routing.eam import EAMCollection
from moeflow.routing.predictor import PredictorConfig, RoutingPredictor
from moeflow.routing.trace import Trace
from tests.experts.policies.decision_log import decisions, digest

LAYERS, EXPERTS, TOP_K, SLOTS = 16, 64, 8, 256
PROMPTS, DECODE = (2048, 600, 300, 40), 8
CASES = [("expertflow", b, "eager", p) for p in ("random", "saturated", "none") for b in (1, 3)]
CASES += [
    ("expertflow", 1, "eager", "ones"),
    ("expertflow", 3, "static", "random"),
    ("lru", 1, "eager", "none"),
]
CASES += [("moe-infinity", 1, "eager", "none"), ("moe-infinity", 3, "eager", "none")]
CASES += [("moe-infinity", b, x, "eamc") for b, x in ((1, "eager"), (4, "eager"), (4, "static"))]
CASES += [("moe-infinity", 4, "eager", "eamc-alt")]
ALT = {"match_k": 3, "predict_own": False, "recent_weight": 0.0, "history_weight": 0.5}
"""The ``eamc-alt`` case's options: the other branches of MoE-Infinity's prediction."""
DECODE_PROMPTS, DECODE_TOKENS = (50, 30, 20, 10, 40, 25, 60, 5), 24
"""The ``eamc`` cases: short prompts, longer decode, and a collection of random EAMs to match against."""


def olmoe_trace(seed: int = 0, prompts: tuple[int, ...] = PROMPTS, decode: int = DECODE) -> Trace:
    """Each request prefers a few experts per layer (Gumbel top-k over Dirichlet preferences: distinct, skewed)."""
    rng = np.random.default_rng(seed)
    req, pos, dec, rows = [], [], [], []
    for rid, prompt in enumerate(prompts):
        n = prompt + decode
        pref = np.log(rng.dirichlet(np.full(EXPERTS, 0.3), size=LAYERS) + 1e-12)  # [L, E]
        keys = pref[None] + rng.gumbel(size=(n, LAYERS, EXPERTS))
        rows.append(np.argpartition(-keys, TOP_K - 1, axis=-1)[..., :TOP_K])
        req += [rid] * n
        pos += list(range(n))
        dec += [t >= prompt for t in range(n)]
    experts = np.concatenate(rows).astype(np.int16)
    n = len(req)
    return Trace("olmoe-prefill", EXPERTS, TOP_K, np.array(req), np.array(pos), np.array(dec), np.arange(n),
                 rng.integers(0, 1000, n), experts, np.ones(experts.shape, np.float32))  # fmt: skip


def olmoe_predictor(kind: str, seed: int = 2) -> RoutingPredictor | None:
    """``random``: small weights; ``saturated``: larger ones (about 6% of the tokens' layers have ties at the top-k
    boundary: probabilities of exactly 1.0); ``ones``: large ones (every row tied); ``none``: no predictor."""
    if kind == "none":
        return None
    cfg = PredictorConfig(LAYERS, EXPERTS, TOP_K, vocab_size=101, emb_dim=16, hidden=32)
    rng = np.random.default_rng(seed)
    std = {"random": 0.3, "saturated": 0.8, "ones": 6.0}[kind]
    h, d, le = cfg.hidden, cfg.emb_dim, LAYERS * EXPERTS
    shapes = {"emb.weight": (101, d), "gru.weight_ih_l0": (3 * h, d), "gru.weight_hh_l0": (3 * h, h),
              "gru.bias_ih_l0": (3 * h,), "gru.bias_hh_l0": (3 * h,), "mix.weight": (h, h + d), "mix.bias": (h,),
              "prev.weight": (h, le), "out.weight": (le, h), "out.bias": (le,)}  # fmt: skip
    weights = {k: rng.normal(0, std, s) for k, s in shapes.items()}
    return RoutingPredictor(cfg, np.arange(0, 1000, 10), weights)


def _sha(a: np.ndarray | None) -> str:
    return "-" if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def probe(pol: CachePolicy) -> list:
    """What a step plans from, bit for bit: ExpertFlow's accuracies and demands, MoE-Infinity's keep-scores."""
    if pol.name == "expertflow":
        return [_sha(pol.accuracy), _sha(pol._demand), _sha(pol._next), _sha(pol.freq)]  # type: ignore[attr-defined]
    if pol.name == "moe-infinity":
        return [_sha(pol._keep)]  # type: ignore[attr-defined]
    return []


def random_collection(entries: int = 64, seed: int = 3) -> EAMCollection:
    eamc = EAMCollection(LAYERS, EXPERTS, 128)
    eamc.extend(np.random.default_rng(seed).poisson(0.5, (entries, LAYERS, EXPERTS)).astype(np.float32))
    return eamc


def prefill_decisions(name: str, batch: int, execution: str, predictor: str) -> list:
    """The decision log of one case (``eamc``, ``eamc-alt``: MoE-Infinity with a collection, on the decode-heavy
    trace)."""
    if predictor.startswith("eamc"):
        trace = olmoe_trace(1, DECODE_PROMPTS, DECODE_TOKENS)
        opts = {"eamc": random_collection(), **(ALT if predictor == "eamc-alt" else {})}
        return decisions(name, batch, execution, SLOTS, trace, None, probe, opts)
    return decisions(name, batch, execution, SLOTS, olmoe_trace(), olmoe_predictor(predictor), probe)


def case_id(name: str, batch: int, execution: str, predictor: str) -> str:
    return f"{name}/{batch}/{execution}/{predictor}"


if __name__ == "__main__":
    out = {}
    for case in CASES:
        log = prefill_decisions(*case)
        out[case_id(*case)] = {"digest": digest(log), "stats": log[-1][1:], "entries": len(log)}
        print(case_id(*case), out[case_id(*case)], flush=True)
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)
