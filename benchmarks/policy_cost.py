"""Host cost of every cache policy's decisions (pure Python/NumPy, no device), per MoE layer, at OLMoE (16 layers x
64 experts) and Qwen3-30B-A3B (48 x 128) shapes, top-8, 25% of the experts cached, decode batch 1 and 8.

Routing is random (each token picks top-8 uniformly: the most misses, so the most bookkeeping); requests decode
``--request-tokens`` tokens each, then end and are replaced, so MoE-Infinity admits EAMs into its collection
(prefilled with ``--eamc`` random EAMs) as it would serving. Per layer: ``observe`` + ``request`` + ``prefetch``
(each layer's distinct experts, what ``request`` is given, are found before the clock starts);
per step: that over all layers plus ``begin_step``, ``end_step`` and ``end_request``, divided by the layers (the
figure the 0.1 ms target is held to). Also timed: ExpertFlow's ``begin_step`` for a 2048-token prefill with a
routing predictor of the model's shape (random weights; the demand it forecasts), apart from the predictor's own
forward pass (the predictor's time is left out of every policy figure: it is the network, which runs on the
device inside the step), and one whole ``--prefill-tokens`` prefill step per policy (``prefill_steps``: the forecast,
then every layer's observe/request/prefetch; Belady is left out, it needs a trace of the future).

    python benchmarks/policy_cost.py --out benchmarks/results/policy-cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies import make_policy
from moeflow.routing.eam import EAMCollection
from moeflow.routing.predictor import PredictorConfig, RoutingPredictor
from moeflow.routing.trace import Trace
from moeflow.sim.simulator import layer_requests

SHAPES = {"olmoe": (16, 64, 8), "qwen3-30b": (48, 128, 8)}


def routing(layers: int, experts: int, top_k: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """[steps, batch, L, K] random distinct experts per token and layer."""
    rng = np.random.default_rng(seed)
    keys = rng.random((steps, batch, layers, experts))
    return np.argpartition(keys, top_k - 1, axis=-1)[..., :top_k].astype(np.int64)


def as_trace(ex: np.ndarray, experts: int, request_tokens: int) -> Trace:
    """The decode steps ``ex`` [S, B, L, K] as a trace (for Belady), requests as ``schedule`` will replay them."""
    steps, batch = ex.shape[:2]
    rid = np.arange(steps)[:, None] // request_tokens * batch + np.arange(batch)[None]  # [S, B]
    order = np.argsort(rid.T.ravel(), kind="stable")
    rows = ex.transpose(1, 0, 2, 3).reshape(-1, *ex.shape[2:])[order]
    req = rid.T.ravel()[order]
    pos = np.concatenate([np.arange((req == r).sum()) for r in np.unique(req)])
    n = len(req)
    return Trace("bench", experts, ex.shape[3], req, pos, np.ones(n, bool), np.arange(n), np.zeros(n, int),
                 rows.astype(np.int16), np.ones(rows.shape, np.float32))  # fmt: skip


def random_predictor(layers: int, experts: int, top_k: int, seed: int = 0) -> RoutingPredictor:
    cfg = PredictorConfig(layers, experts, top_k, vocab_size=1025)
    rng = np.random.default_rng(seed)
    h, d, le = cfg.hidden, cfg.emb_dim, layers * experts
    shapes = {"emb.weight": (1025, d), "gru.weight_ih_l0": (3 * h, d), "gru.weight_hh_l0": (3 * h, h),
              "gru.bias_ih_l0": (3 * h,), "gru.bias_hh_l0": (3 * h,), "mix.weight": (h, h + d), "mix.bias": (h,),
              "prev.weight": (h, le), "out.weight": (le, h), "out.bias": (le,)}  # fmt: skip
    return RoutingPredictor(cfg, np.arange(1024), {k: rng.normal(0, 0.1, s) for k, s in shapes.items()})


class TimedPredictor:
    """A predictor that counts the seconds of its own forward passes (``encode``/``head``/``predict``), so that
    the policy's bookkeeping is timed apart from the network (which the device runs inside the step)."""

    def __init__(self, inner: RoutingPredictor):
        self.inner, self.seconds = inner, 0.0
        self.shape, self.cfg, self.init_state = inner.shape, inner.cfg, inner.init_state

    def _timed(self, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def predict(self, *args):  # type: ignore[no-untyped-def]
        return self._timed(self.inner.predict, *args)

    def encode(self, *args):  # type: ignore[no-untyped-def]
        return self._timed(self.inner.encode, *args)

    def head(self, *args):  # type: ignore[no-untyped-def]
        return self._timed(self.inner.head, *args)


def decode_cost(name: str, shape: tuple[int, int, int], batch: int, args: argparse.Namespace) -> dict:
    layers, experts, top_k = shape
    ex = routing(layers, experts, top_k, batch, args.warmup + args.steps)
    pol = make_policy(name)
    pol.bind(layers * experts // 4, layers, experts, top_k)
    rng = np.random.default_rng(1)
    pred = TimedPredictor(random_predictor(*shape))
    opts: dict = {"batch_size": batch, "predictor": pred}
    opts["eamc"] = EAMCollection(layers, experts, 1000)
    opts["eamc"].extend(rng.poisson(0.5, (args.eamc, layers, experts)).astype(np.float32))
    trace = as_trace(ex, experts, args.request_tokens) if name == "belady" else None
    pol.setup(PolicyContext(trace=trace, options=opts))
    per_layer, per_step = [], []
    for s in range(len(ex)):
        gen = s // args.request_tokens
        rids = tuple(gen * batch + b for b in range(batch))
        info = StepInfo(
            s, rids, tuple((int(s % 97),) for _ in rids), (s % args.request_tokens,) * batch, False
        )
        ended = rids if (s + 1) % args.request_tokens == 0 else ()
        # each layer's distinct experts, found before the clock starts: the engine has them from its own routing
        # (the simulator from the trace), so they are no part of the policy's decision
        wanted = [np.unique(ex[s, :, layer]).tolist() for layer in range(layers)]
        t_step, net0 = time.perf_counter(), pred.seconds
        pol.begin_step(info)
        pol.prefetch(-1)
        layer_t = []
        for layer in range(layers):
            routed, experts = ex[s, :, layer], wanted[layer]  # [B, K], its distinct experts
            t0 = time.perf_counter()
            pol.observe(layer, routed, None)
            pol.request(layer, experts)
            pol.prefetch(layer)
            layer_t.append(time.perf_counter() - t0)
        pol.end_step()
        for rid in ended:
            pol.end_request(rid)
        if s >= args.warmup:
            per_step.append((time.perf_counter() - t_step - (pred.seconds - net0)) / layers)
            per_layer += layer_t
    us = 1e6
    return {"us_per_layer_median": float(np.median(per_layer) * us), "us_per_layer_mean": float(np.mean(per_layer) * us),
            "us_per_layer_with_step_hooks_mean": float(np.mean(per_step) * us),
            "us_per_layer_with_step_hooks_max": float(np.max(per_step) * us), "hit_ratio": pol.stats.hit_ratio}  # fmt: skip


def prefill_cost(shape: tuple[int, int, int], tokens: int, repeats: int = 3) -> dict:
    """ExpertFlow's ``begin_step`` for one ``tokens``-token prefill, and the predictor's forward alone."""
    layers, experts, top_k = shape
    pred = TimedPredictor(random_predictor(*shape))
    ids = np.arange(tokens) % 1024
    best_policy = best_pred = float("inf")
    for r in range(repeats):
        pol = make_policy("expertflow")
        pol.bind(layers * experts // 4, layers, experts, top_k)
        pol.setup(PolicyContext(options={"batch_size": 1, "predictor": pred}))
        info = StepInfo(0, (r,), (tuple(int(t) for t in ids),), (0,), True)
        t0, net0 = time.perf_counter(), pred.seconds
        pol.begin_step(info)
        total, net = time.perf_counter() - t0, pred.seconds - net0
        best_policy, best_pred = min(best_policy, total - net), min(best_pred, net)
    return {
        "tokens": tokens,
        "forecast_bookkeeping_ms": best_policy * 1e3,
        "predictor_forward_ms": best_pred * 1e3,
    }


def prefill_step_cost(name: str, shape: tuple[int, int, int], tokens: int, repeats: int = 3) -> dict:
    """One whole ``tokens``-token prefill step of policy ``name`` on a fresh pool (random routing, every layer's
    distinct experts requested in chunks of at most the pool, as the simulator does): ``begin_step`` and
    ``prefetch(-1)``, then per layer ``observe`` + ``request`` + ``prefetch``, and ``end_step``; best of
    ``repeats``, the predictor's forward left out. ExpertFlow's per-token work is split between ``begin_step`` (the
    forecast) and ``observe`` (the correction), so only the whole step compares across policies."""
    layers, experts, top_k = shape
    ex = routing(layers, experts, top_k, tokens, 1, seed=2)[0]  # [T, L, K]
    slots = layers * experts // 4
    chunks = [layer_requests(ex[:, layer], slots) for layer in range(layers)]
    pred = TimedPredictor(random_predictor(*shape))
    ids = tuple(int(t) for t in np.arange(tokens) % 1024)
    best: dict[str, float] = {}
    for r in range(repeats):
        pol = make_policy(name)
        pol.bind(slots, layers, experts, top_k)
        pol.setup(PolicyContext(options={"batch_size": 1, "predictor": pred}))
        t0, net0 = time.perf_counter(), pred.seconds
        pol.begin_step(StepInfo(0, (r,), (ids,), (0,), True))
        pol.prefetch(-1)
        t1 = time.perf_counter()
        for layer in range(layers):
            pol.observe(layer, ex[:, layer], None)
            for chunk in chunks[layer]:
                pol.request(layer, chunk)
            pol.prefetch(layer)
        pol.end_step()
        t2, net = time.perf_counter(), pred.seconds - net0
        row = {
            "step_ms": (t2 - t0 - net) * 1e3,
            "begin_ms": (t1 - t0 - net) * 1e3,
            "layers_ms": (t2 - t1) * 1e3,
        }
        if not best or row["step_ms"] < best["step_ms"]:
            best = row
    return {"tokens": tokens, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="lru,lfu,moe-infinity,expertflow,expertflow-reuse,belady")
    ap.add_argument("--shapes", default="olmoe,qwen3-30b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (they fill the pool)")
    ap.add_argument("--request-tokens", type=int, default=8, help="decode tokens per request")
    ap.add_argument(
        "--eamc", type=int, default=1000, help="random EAMs MoE-Infinity's collection starts with"
    )
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        for name in args.policies.split(","):
            for batch in map(int, args.batches.split(",")):
                row = {
                    "shape": shape,
                    "policy": name,
                    "batch": batch,
                    **decode_cost(name, SHAPES[shape], batch, args),
                }
                rows.append(row)
                print(
                    json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
    prefill = {s: prefill_cost(SHAPES[s], args.prefill_tokens) for s in args.shapes.split(",")}
    print(json.dumps({"expertflow_prefill": prefill}), flush=True)
    steps = []
    for shape in args.shapes.split(","):
        for name in args.policies.split(","):
            if name == "belady":  # needs the future: a trace of the prefill (not modelled here)
                continue
            steps.append(
                {
                    "shape": shape,
                    "policy": name,
                    **prefill_step_cost(name, SHAPES[shape], args.prefill_tokens),
                }
            )
            print(
                json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in steps[-1].items()}),
                flush=True,
            )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"command": " ".join(["python", *sys.argv]), "commit": commit, "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
           "versions": {"python": platform.python_version(), "numpy": np.__version__},
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "shapes": SHAPES, "cache_fraction": 0.25,
           "runs": rows, "expertflow_prefill": prefill, "prefill_steps": steps}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
