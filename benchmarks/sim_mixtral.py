"""Cache policies on the real Mixtral-8x7B-Instruct GSM8K routing trace (two problems, 244 decode tokens; see
../shared/traces/README.md), with the EAM collection always built from routing other than the held-out one.

Protocols (each fold: EAMC source -> held-out requests; results pooled over folds):
  cross          problem 0 -> problem 1 and problem 1 -> problem 0 (batch 1)
  halves         each answer cut in two: every half held out in turn, EAMC from the other three (batch 1)
  halves-batch2  both halves of one problem run as two requests at batch 2, EAMC from the other problem's halves

MoE-Infinity variants beside the default: cache-only (prefetch off), 1 prefetch per layer, an EAMC of random
routing (prefetch volume without prediction) and an oracle EAMC holding the held-out requests' own EAMs (the
ceiling of matching).

    python benchmarks/sim_mixtral.py --compute-per-layer-ms 0.25 --out benchmarks/results/sim-mixtral
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from sim_sweep import gap_closed, git_commit, sweep

from moeflow.routing.eam import EAMCollection, eam_from_experts, eams_from_trace
from moeflow.routing.importer import import_jsonl
from moeflow.routing.trace import Trace
from moeflow.sim import TimingModel
from moeflow.sim.plot import plot_hit_ratio

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-gsm8k.jsonl"
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
"""w1, w3 (4096->14336) and w2 (14336->4096) in bfloat16."""
CACHE_PCTS = [10, 20, 25, 30, 40, 50, 60, 75]
SUM_KEYS = ("hits", "misses", "prefetches", "prefetch_hits", "prefetch_wasted", "loads", "decode_tokens")


def split_halves(trace: Trace) -> Trace:
    """Each request's rows cut in two requests: ids 2r (first half) and 2r+1 (second half)."""
    req = trace.request.copy()
    for rid in trace.requests():
        rows = np.flatnonzero(trace.request == rid)
        req[rows[: len(rows) // 2]] = 2 * rid
        req[rows[len(rows) // 2 :]] = 2 * rid + 1
    out = trace.select(np.ones(trace.num_tokens, bool))
    out.request = req
    return out


def random_like(trace: Trace, seed: int = 0) -> EAMCollection:
    """An EAMC of uniformly random top-k routing, one entry per request of ``trace`` with as many tokens."""
    rng = np.random.default_rng(seed)
    c = EAMCollection(trace.num_layers, trace.num_experts)
    for rid in trace.requests():
        n = int((trace.request == rid).sum())
        ex = np.argsort(rng.random((n, trace.num_layers, trace.num_experts)), axis=2)[:, :, : trace.top_k]
        c.add(eam_from_experts(ex, trace.num_experts))
    return c


def folds(trace: Trace) -> dict[str, list[tuple[list[int], Trace, list[int]]]]:
    """protocol -> [(source request ids, trace they index, held-out request ids)] plus the batch sizes."""
    halves = split_halves(trace)
    ids = halves.requests()
    return {
        "cross": [([0], trace, [1]), ([1], trace, [0])],
        "halves": [([j for j in ids if j != i], halves, [i]) for i in ids],
        "halves-batch2": [([0, 1], halves, [2, 3]), ([2, 3], halves, [0, 1])],
    }


def pooled(results: list[dict]) -> list[dict]:
    """Sum counts over folds per (batch, cache, label); hit ratio and time per token recomputed."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["batch_size"], r["cache_slots"], r["label"])].append(r)
    out = []
    for (batch, slots, label), rs in groups.items():
        row = {k: sum(r[k] for r in rs) for k in SUM_KEYS}
        row.update(batch_size=batch, cache_slots=slots, cache_fraction=rs[0]["cache_fraction"], label=label)
        row["policy"] = rs[0]["policy"]
        row["hit_ratio"] = row["hits"] / (row["hits"] + row["misses"])
        row["bytes_moved"] = sum(r["bytes_moved"] for r in rs)
        row["time_per_token_ms"] = 1e3 * sum(r["timing"]["decode_time_s"] for r in rs) / row["decode_tokens"]
        row["folds"] = len(rs)
        out.append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--out", default="benchmarks/results/sim-mixtral", help="prefix of the JSON/PNG files")
    p.add_argument("--compute-per-layer-ms", type=float, default=0.25)
    p.add_argument("--bandwidth", type=float, default=52.0, help="host->device GB/s")
    args = p.parse_args()
    trace = import_jsonl(args.trace)
    timing = TimingModel(MIXTRAL_EXPERT_BYTES, args.bandwidth * 1e9, args.compute_per_layer_ms * 1e-3)
    batches = {"cross": [1], "halves": [1], "halves-batch2": [2]}
    for protocol, fold_list in folds(trace).items():
        results = []
        for k, (src_ids, base, held_ids) in enumerate(fold_list):
            source, held = base.of_requests(src_ids), base.of_requests(held_ids)
            oracle = EAMCollection(trace.num_layers, trace.num_experts)
            oracle.extend(eams_from_trace(held).values())
            policies = [
                "lru",
                "lfu",
                "moe-infinity",
                ("moe-infinity/cache-only", "moe-infinity", {"prefetch": 0}),
                ("moe-infinity/1-per-layer", "moe-infinity", {"max_prefetch": 1}),
                ("moe-infinity/random-eamc", "moe-infinity", {"eamc": random_like(source, seed=k)}),
                ("moe-infinity/oracle-eamc", "moe-infinity", {"eamc": oracle}),
                "belady",
            ]
            eamc = EAMCollection.from_traces([source])
            for r in sweep(held, eamc, CACHE_PCTS, batches[protocol], policies, timing):
                r.update(fold=k, source_requests=src_ids, heldout_requests=held_ids)
                results.append(r)
        pool = pooled(results)
        doc = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "commit": git_commit(),
            "trace": str(args.trace),
            "protocol": protocol,
            "folds": [{"source": s, "heldout": h} for s, _, h in fold_list],
            "request_ids": "halves: 2r = first half of problem r, 2r+1 = second half"
            if "halves" in protocol
            else "",
            "timing_model": timing.constants(),
            "gap_closed_hit_ratio": gap_closed(pool),
            "gap_closed_loads": gap_closed(pool, "loads"),
            "pooled": pool,
            "runs": results,
        }
        path = Path(f"{args.out}-{protocol}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        plot_hit_ratio(
            pool, path.with_suffix(".png"), f"Mixtral-8x7B GSM8K trace, {protocol} (pooled over folds)"
        )
        print(f"== {protocol}")
        print(table(pool))
    return 0


def table(pool: list[dict]) -> str:
    """Markdown: hit ratio, loads and modelled ms/token per label at each cache size."""
    lines = [
        "| cache | policy | hit ratio | loads | prefetch wasted | ms/token |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(pool, key=lambda r: (r["batch_size"], r["cache_slots"])):
        lines.append(
            f"| {100 * r['cache_fraction']:.0f}% (b{r['batch_size']}) | {r['label']} | {r['hit_ratio']:.3f} | "
            f"{r['loads']} | {r['prefetch_wasted']} | {r['time_per_token_ms']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
