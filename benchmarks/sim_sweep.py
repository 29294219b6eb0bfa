"""Cache-policy sweep on a trace pair: the EAM collection is built from a source trace, every registered policy
is replayed on a held-out trace at several cache sizes and batch sizes; JSON and a hit-ratio plot come out.

    python benchmarks/sim_sweep.py --source traces/demo-train.npz --heldout traces/demo-heldout.npz \
        --model-dir models/demo --out benchmarks/results/sim-demo

writes ``sim-demo.json`` and ``sim-demo.png``. The JSON carries the command, the time model's constants, every
run, and per (batch, cache) the share of the LRU->Belady gap each policy closes, in hit ratio
((policy - lru) / (belady - lru); the issue's target is >= 0.5 for moe-infinity at 25% cache) and in loads
(experts copied: (lru - policy) / (lru - belady)).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from moeflow.cli.sim import expert_bytes, load_trace
from moeflow.experts.cache import POLICIES
from moeflow.experts.policies import make_policy
from moeflow.routing.eam import EAMCollection
from moeflow.sim import TimingModel, simulate
from moeflow.sim.plot import plot_hit_ratio
from moeflow.sim.timing import DEFAULT_BANDWIDTH, DEFAULT_COMPUTE_PER_LAYER


def all_policies() -> list[str]:
    make_policy("lru")  # imports the plug-in policies
    names = sorted(POLICIES)
    return [n for n in names if n != "belady"] + ["belady"]


def sweep(
    heldout: object,
    eamc: EAMCollection | None,
    cache_pcts: list[float],
    batches: list[int],
    policies: list[str | tuple[str, str, dict]],
    timing: TimingModel | None,
    options: dict | None = None,
) -> list[dict]:
    """Every (batch, cache %, policy) run on ``heldout``. A policy is a name, or (label, name, extra options)."""
    total = heldout.num_layers * heldout.num_experts  # type: ignore[attr-defined]
    out = []
    for batch in batches:
        for pct in cache_pcts:
            slots = max(1, round(pct / 100 * total))
            for spec in policies:
                label, name, extra = (spec, spec, {}) if isinstance(spec, str) else spec
                opts = dict(options or {})
                if eamc is not None:
                    opts["eamc"] = eamc
                opts.update(extra)  # a variant may bring its own collection
                res = simulate(heldout, name, slots, batch, timing=timing, options=opts).to_dict()  # type: ignore[arg-type]
                res["label"] = label
                out.append(res)
    return out


def gap_closed(results: list[dict], metric: str = "hit_ratio") -> list[dict]:
    """Per (batch, cache slots), the share of the LRU->Belady gap each label closes: for ``hit_ratio``
    (x - lru) / (belady - lru); for ``loads`` (experts copied, i.e. bytes) (lru - x) / (lru - belady).
    Belady bounds loads for every policy, but not the hit ratio of a prefetching one (prefetches are loads
    that are not misses), so a prefetching policy can exceed 1 on ``hit_ratio``."""
    sign = -1.0 if metric == "loads" else 1.0
    rows = []
    keys = sorted({(r["batch_size"], r["cache_slots"]) for r in results})
    for batch, slots in keys:
        group = {r["label"]: r for r in results if (r["batch_size"], r["cache_slots"]) == (batch, slots)}
        if "lru" not in group or "belady" not in group:
            continue
        lru, opt = sign * group["lru"][metric], sign * group["belady"][metric]
        row = {"batch_size": batch, "cache_slots": slots, "cache_fraction": group["lru"]["cache_fraction"]}
        for label, r in group.items():
            row[label] = (sign * r[metric] - lru) / (opt - lru) if opt > lru else None
        rows.append(row)
    return rows


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", nargs="+", required=True, help="trace(s) the EAM collection is built from")
    p.add_argument("--heldout", required=True, help="trace the policies are evaluated on")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.png")
    p.add_argument(
        "--cache", type=float, nargs="+", default=[10, 25, 50], help="cache sizes, %% of all experts"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--policies", default="all", help="comma-separated, or 'all' registered policies")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="policy option")
    p.add_argument("--expert-bytes", default=None, help="bytes per expert (or --model-dir)")
    p.add_argument("--model-dir", default=None, help="checkpoint whose geometry gives the bytes per expert")
    p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH / 1e9, help="host->device GB/s")
    p.add_argument("--compute-per-layer-ms", type=float, default=DEFAULT_COMPUTE_PER_LAYER * 1e3)
    args = p.parse_args()

    from moeflow.cli.sim import parse_options

    heldout = load_trace(args.heldout)
    sources = [load_trace(s) for s in args.source]
    eamc = EAMCollection.from_traces(sources)
    nbytes = expert_bytes(args)
    timing = TimingModel(nbytes, args.bandwidth * 1e9, args.compute_per_layer_ms * 1e-3) if nbytes else None
    policies = all_policies() if args.policies == "all" else args.policies.split(",")
    n_req = len(heldout.requests())
    batches = [b for b in args.batch if b <= n_req]
    results = sweep(heldout, eamc, args.cache, batches, policies, timing, parse_options(args.option))
    doc = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": git_commit(),
        "source": args.source,
        "heldout": args.heldout,
        "heldout_requests": n_req,
        "eamc_entries": len(eamc),
        "skipped_batches": [b for b in args.batch if b > n_req],
        "timing_model": timing.constants() if timing else None,
        "gap_closed_hit_ratio": gap_closed(results),
        "gap_closed_loads": gap_closed(results, "loads"),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_hit_ratio(
        results, args.out + ".png", f"held-out {Path(args.heldout).name}, EAMC from {len(sources)} trace(s)"
    )
    for row in doc["gap_closed_hit_ratio"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
