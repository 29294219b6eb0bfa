"""Byte-aware prefetch (``experts/policies/link.py``) in the simulator, on routing the policies were not tuned on,
at 25% of the experts cached, next to LRU and Belady:

* Mixtral-8x7B-Instruct (the shared GSM8K trace, ../shared/traces): protocol ``cross`` (MoE-Infinity's collection
  from one problem, the other held out; pooled over both folds), batch 1 (one request per fold: batch 8 is the
  same run). ``mixtral-cross-batch1``: whole problems, as before (their first halves were the tuning split of
  ``variant=calibrated``); ``mixtral-heldout-halves``: only the second halves of the problems (never tuned on),
  the collection from the other problem's first half.
* The demo model's held-out prompts (``benchmarks/traces/demo-heldout-{code,prose}-8.npz``, 16 requests; the shipped
  predictor and ``eamc-demo-train.npz``, both from training-split prompts), OLMoE-1B-7B expert size, batch 1 and 8.

Time model: the simulator's (``sim/timing.py``) with the per-layer compute of ``sim_headline.py`` for each model;
the byte-aware rule reads the same constants through ``on_timing``. No setting was tuned on the held-out routing.

    python benchmarks/sim_byte_aware.py --out benchmarks/results/sim-byte-aware.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from moeflow.routing.eam import EAMCollection
from moeflow.routing.importer import import_jsonl
from moeflow.routing.trace import Trace
from moeflow.sim import TimingModel, simulate

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT.parent / "shared" / "traces" / "mixtral-8x7b-instruct-gsm8k.jsonl"
POLICIES = [
    ("lru", "lru", {}),
    ("moe-infinity", "moe-infinity", {}),
    ("moe-infinity/byte-aware", "moe-infinity", {"byte_aware": True}),
    ("moe-infinity/calibrated", "moe-infinity", {"variant": "calibrated"}),
    ("moe-infinity/calibrated, no prefetch", "moe-infinity", {"variant": "calibrated", "min_prob": 2.0}),
    ("expertflow", "expertflow", {}),
    ("expertflow/byte-aware", "expertflow", {"byte_aware": True}),
    ("belady", "belady", {}),
]


def run(trace: Trace, slots: int, batch: int, timing: TimingModel, extra: dict) -> list[dict]:
    out = []
    for label, name, opts in POLICIES:
        r = simulate(trace, name, slots, batch, timing=timing, options={**extra, **opts}).to_dict()
        r["label"] = label
        out.append(r)
    return out


def halves(trace: Trace, first: bool) -> Trace:
    """The first (or second) half of each request's rows (the Mixtral trace's tuning and held-out splits)."""
    keep = np.zeros(trace.num_tokens, bool)
    for rid in trace.requests():
        rows = np.flatnonzero(trace.request == rid)
        keep[rows[: len(rows) // 2] if first else rows[len(rows) // 2 :]] = True
    return trace.select(keep)


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def summary(rows: list[dict]) -> dict:
    """Per label: hit ratio, loads, and the targets' ratios (share of the LRU->Belady hit-ratio gap closed; bytes
    against LRU's and Belady's)."""
    by = {r["label"]: r for r in rows}
    lru, opt = by["lru"]["hit_ratio"], by["belady"]["hit_ratio"]
    out = {}
    for label, r in by.items():
        out[label] = {
            "hit_ratio": round(r["hit_ratio"], 4), "loads": r["loads"], "prefetches": r["prefetches"],
            "gap_closed": round((r["hit_ratio"] - lru) / (opt - lru), 3) if opt > lru else None,
            "bytes_vs_lru": round(r["loads"] / by["lru"]["loads"], 3),
            "bytes_vs_belady": round(r["loads"] / by["belady"]["loads"], 3),
            "hit_ratio_vs_belady": round(r["hit_ratio"] / by["belady"]["hit_ratio"], 3),
            "modelled_ms_per_token": round(1e3 * r["decode_time_s"] / r["decode_tokens"], 3),
        }  # fmt: skip
    return out


def pool(runs: list[list[dict]]) -> list[dict]:
    """Sum counts of the same label over folds."""
    out = []
    for rows in zip(*runs):
        r = dict(rows[0])
        for k in ("hits", "misses", "prefetches", "loads", "decode_tokens"):
            r[k] = sum(x[k] for x in rows)
        r["decode_time_s"] = sum(x["timing"]["decode_time_s"] for x in rows)
        r["hit_ratio"] = r["hits"] / (r["hits"] + r["misses"])
        out.append(r)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bandwidth", type=float, default=52.0, help="host->device GB/s")
    args = ap.parse_args()
    doc: dict = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
                 "versions": {"python": platform.python_version(), "numpy": np.__version__},
                 "cache_fraction": 0.25, "cases": {}}  # fmt: skip
    # Mixtral, cross: EAMC from one problem, the other held out
    mix = import_jsonl(MIXTRAL)
    timing = TimingModel(3 * 4096 * 14336 * 2, args.bandwidth * 1e9, 0.584e-3)
    slots = round(0.25 * mix.num_layers * mix.num_experts)
    folds = []
    for src, held in ((0, 1), (1, 0)):
        eamc = EAMCollection.from_traces([mix.of_requests([src])])
        folds.append(run(mix.of_requests([held]), slots, 1, timing, {"eamc": eamc}))
    rows = pool(folds)
    doc["cases"]["mixtral-cross-batch1"] = {
        "timing": timing.constants(),
        "slots": slots,
        "summary": summary(rows),
    }
    print(
        json.dumps({"mixtral-cross-batch1": doc["cases"]["mixtral-cross-batch1"]["summary"]}, indent=1),
        flush=True,
    )
    train, held = halves(mix, True), halves(mix, False)
    folds = []
    for src, dst in ((0, 1), (1, 0)):
        eamc = EAMCollection.from_traces([train.of_requests([src])])
        folds.append(run(held.of_requests([dst]), slots, 1, timing, {"eamc": eamc}))
    doc["cases"]["mixtral-heldout-halves"] = {"timing": timing.constants(), "slots": slots,
                                              "summary": summary(pool(folds))}  # fmt: skip
    print(json.dumps({"mixtral-heldout-halves": doc["cases"]["mixtral-heldout-halves"]["summary"]}, indent=1))
    # demo model, held-out prompts
    parts = [Trace.load(ROOT / f"benchmarks/traces/demo-heldout-{d}-8.npz") for d in ("code", "prose")]
    timing = TimingModel(3 * 2048 * 1024 * 2, args.bandwidth * 1e9, 1.93e-3)
    opts = {"eamc": str(ROOT / "benchmarks/traces/eamc-demo-train.npz"),
            "predictor": str(ROOT / "benchmarks/traces/predictor-demo.pt")}  # fmt: skip
    for batch in (1, 8):
        runs = [run(t, round(0.25 * t.num_layers * t.num_experts), batch, timing, opts) for t in parts]
        rows = pool(runs)
        name = f"demo-heldout-batch{batch}"
        doc["cases"][name] = {"timing": timing.constants(), "summary": summary(rows)}
        print(json.dumps({name: doc["cases"][name]["summary"]}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
