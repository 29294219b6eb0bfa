"""How close each policy's bytes per decode token come to Belady's, in the simulator, at 25% of the experts cached
(issues 9 and 15): LRU, ExpertFlow (plain and byte-aware), MoE-Infinity, ``expertflow-reuse`` (request-level reuse,
``experts/policies/reuse.py``) and Belady's demand-only optimum.

Cases (routing of the demo model; OLMoE-1B-7B expert size, 12.6 MB; 1.93 ms per layer; 52 GB/s; the time model of
``sim/timing.py``):

* ``engine``: as ``decode_floor.py`` replays ``demo-eval.npz`` on the GPU: each request's prompt cut to its first 64
  tokens (one prefill step) and its next 31 recorded tokens replayed as decode steps; all 48 requests, and the first
  8 (the GPU rows' requests);
* ``full``: the whole ``demo-eval.npz`` (full prompts, 63 decode tokens each);
* ``heldout8``: ``demo-heldout-{code,prose}-8.npz`` pooled (with ``predictor-demo.pt``: the shipped
  ``models/demo/moeflow/predictor.pt`` saw those prompts in training).

Execution ``static`` is the engine's graph decode (boundaries, zero-copy misses, read-through fills into offered
slots); ``eager`` the per-layer demand path. Belady is the eager demand-only optimum of the same steps in both:
the floor ``decode_floor.py`` computes; ``belady/engine-fill-rule`` is Belady's eviction order run under the
engine's static fill rule (no bypass, no emptied slots), for reference. ``--select TRACE`` first scores a grid of the new policy's settings on a
training trace (engine cut, static, each batch size) and uses the best of each batch size; otherwise the settings given by ``--reuse``.

    python benchmarks/sim_policy_gap.py --select .data/traces/demo-train-24.npz \
        --out benchmarks/results/sim-policy-gap.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moeflow.routing.trace import Trace
from moeflow.sim import TimingModel, simulate

ROOT = Path(__file__).resolve().parents[1]
TIMING = TimingModel(3 * 2048 * 1024 * 2, 52e9, 1.93e-3)
PREDICTOR = str(ROOT / "models/demo/moeflow/predictor.pt")
PREDICTOR_TRAIN = str(ROOT / "benchmarks/traces/predictor-demo.pt")
EAMC = str(ROOT / "benchmarks/traces/eamc-demo-train.npz")
BASE = [
    ("lru", "lru", {}),
    ("moe-infinity", "moe-infinity", {}),
    ("expertflow", "expertflow", {}),
    ("expertflow/byte-aware", "expertflow", {"byte_aware": True}),
]
H200 = {"h2d_GBps": 55.37, "resident_ms": {1: 2.196, 8: 0.859}}
"""``decode-floor-h200.json``'s bandwidth and all-resident step: a floor is resident ms + bytes per token / bandwidth
(how that benchmark states its own and Belady's floors)."""
GRID = {
    "req_prior": [1.0, 4.0, 16.0],
    "req_decay": [1.0, 0.95],
    "bypass": [0.0, 1.0],
    "vacate": [0.0, 0.5],
    "min_prob": [0.5, 2.0],  # ExpertFlow's prefetch threshold: 2 turns prefetching off
}


def engine_cut(trace: Trace, max_prompt: int = 64, decode_tokens: int = 31, requests: int = 0) -> Trace:
    """Each request's first ``max_prompt`` tokens as its prompt and its next ``decode_tokens`` as decode steps (the
    rows ``decode_floor.py`` replays); the first ``requests`` requests (0: all)."""
    keep = np.zeros(trace.num_tokens, bool)
    decode = np.zeros(trace.num_tokens, bool)
    ids = trace.requests()[:requests] if requests else trace.requests()
    for rid in ids:
        rows = np.flatnonzero(trace.request == rid)
        rows = rows[np.argsort(trace.position[rows], kind="stable")][: max_prompt + decode_tokens]
        keep[rows] = True
        decode[rows[max_prompt:]] = True
    return dataclasses.replace(trace, decode=decode).select(keep)


def row(trace: Trace, label: str, name: str, opts: dict, batch: int, execution: str) -> dict:
    slots = round(0.25 * trace.num_layers * trace.num_experts)
    t0 = time.perf_counter()
    ex = "eager" if name == "belady" and not opts.get("static_belady") else execution
    r = simulate(trace, name, slots, batch, timing=TIMING, options=opts, execution=ex)
    return {
        "label": label, "execution": ex, "hits": r.hits, "misses": r.misses, "decode_loads": r.decode_loads,
        "prefetches": r.prefetches, "decode_tokens": r.decode_tokens, "decode_time_s": r.timing["decode_time_s"],
        "sim_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def summary(rows: list[dict], batch: int) -> dict:
    """Per label: hit ratio, decode bytes per token and their ratios to LRU's and Belady's, the share of the
    LRU->Belady byte gap closed, modelled ms per token, and the H200 floor (``H200``) against Belady's."""
    by = {r["label"]: r for r in rows}
    per_tok = {k: r["decode_loads"] / r["decode_tokens"] for k, r in by.items()}
    lru, opt = per_tok["lru"], per_tok["belady"]
    resident = H200["resident_ms"].get(batch, 0.0)

    def floor(loads: float) -> float:
        return resident + loads * TIMING.expert_bytes / (H200["h2d_GBps"] * 1e6)

    out = {}
    for label, r in by.items():
        out[label] = {
            "hit_ratio": round(r["hits"] / (r["hits"] + r["misses"]), 4),
            "mb_per_token": round(per_tok[label] * TIMING.expert_bytes / 1e6, 1),
            "bytes_vs_lru": round(per_tok[label] / lru, 3),
            "bytes_vs_belady": round(per_tok[label] / opt, 3),
            "byte_gap_closed": round((lru - per_tok[label]) / (lru - opt), 3) if lru > opt else None,
            "modelled_ms_per_token": round(1e3 * r["decode_time_s"] / r["decode_tokens"], 2),
            "h200_floor_ms": round(floor(per_tok[label]), 2),
            "floor_vs_belady": round(floor(per_tok[label]) / floor(opt), 3),
            "prefetches": r["prefetches"],
        }
    return out


def pooled(parts: list[list[dict]]) -> list[dict]:
    out = []
    for rows in zip(*parts):
        r = dict(rows[0])
        for k in ("hits", "misses", "decode_loads", "prefetches", "decode_tokens", "decode_time_s"):
            r[k] = sum(x[k] for x in rows)
        out.append(r)
    return out


def select(trace: Trace, predictor: str, batch: int) -> tuple[dict, list]:
    """The grid's best settings of ``expertflow-reuse`` by decode bytes (engine cut, static, ``batch``)."""
    scores = []
    for values in itertools.product(*GRID.values()):
        opts = dict(zip(GRID, values))
        r = row(trace, "reuse", "expertflow-reuse", {**opts, "predictor": predictor}, batch, "static")
        scores.append({**opts, "decode_loads": r["decode_loads"], "hits": r["hits"], "misses": r["misses"]})
        print("select", scores[-1], flush=True)
    best = min(scores, key=lambda s: s["decode_loads"])
    return {k: best[k] for k in GRID}, scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--select", default=None, help="training trace to choose expertflow-reuse's settings on")
    ap.add_argument("--reuse", default="", help="expertflow-reuse settings key=value,... (without --select)")
    ap.add_argument("--cases", default="engine,engine8,full,heldout8")
    ap.add_argument("--executions", default="static,eager")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc: dict = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": commit,
                 "machine": f"{platform.node()} {platform.machine()} {platform.processor()} (CPU, simulator)",
                 "cache_fraction": 0.25, "timing": TIMING.constants(), "cases": {}}  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    given = dict(kv.split("=") for kv in args.reuse.split(",") if kv)
    reuse = {b: given for b in batches}
    if args.select:
        train = engine_cut(Trace.load(args.select))
        doc["selection"] = {"trace": args.select, "cut": "engine", "execution": "static", "predictor": PREDICTOR,
                            "criterion": "fewest decode loads", "grid": GRID, "by_batch": {}}  # fmt: skip
        for b in batches:
            reuse[b], scores = select(train, PREDICTOR, b)
            doc["selection"]["by_batch"][str(b)] = {"scores": scores, "chosen": reuse[b]}
    doc["reuse_settings"] = {str(b): v for b, v in reuse.items()}
    static_belady = ("belady/engine-fill-rule", "belady", {"static_belady": True})
    eval_trace = Trace.load(ROOT / "benchmarks/traces/demo-eval.npz")
    heldout = [Trace.load(ROOT / f"benchmarks/traces/demo-heldout-{d}-8.npz") for d in ("code", "prose")]
    cases = {
        "engine": ([engine_cut(eval_trace)], PREDICTOR),
        "engine8": ([engine_cut(eval_trace, requests=8)], PREDICTOR),
        "full": ([eval_trace], PREDICTOR),
        "heldout8": (heldout, PREDICTOR_TRAIN),
    }
    for case in args.cases.split(","):
        traces, predictor = cases[case]
        for execution in args.executions.split(","):
            for batch in batches:
                if case == "full" and batch != 1:
                    continue  # the long prompts make the batch-8 rows slow here; the engine cut has them
                opts = {"predictor": predictor, "eamc": EAMC}
                policies = [
                    *BASE,
                    ("expertflow-reuse", "expertflow-reuse", reuse[batch]),
                    ("belady", "belady", {}),
                ]
                pols = policies + ([static_belady] if execution == "static" and case != "full" else [])
                parts = [
                    [row(t, lab, name, {**opts, **o}, batch, execution) for lab, name, o in pols]
                    for t in traces
                ]
                key = f"{case}/{execution}/batch{batch}"
                doc["cases"][key] = {"predictor": predictor, "summary": summary(pooled(parts), batch)}
                print(json.dumps({key: doc["cases"][key]["summary"]}), flush=True)
                Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
