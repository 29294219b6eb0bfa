"""Host time of a cache policy's calls between static decode steps, in the engine's own call pattern: per step its
``begin_step``, ``plan_boundary`` and ``settle_step`` (the last with every MoE layer's routing at once), timed
inside the engine on the demo model (16 layers x 64 experts, top-8) with the demo evaluation trace replayed, 25% of
the experts cached, decode batch 1 and 8 (CPU, ``decode="static"``: the same calls the GPU's graph decode makes).
On the GPU this time is spent between replays, so it is what a policy's ms/token carries above its byte floor.

    python benchmarks/policy_static_cost.py --out benchmarks/results/policy-static-cost-cpu.json
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

from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow.routing.trace import Trace

CALLS = ("begin_step", "plan_boundary", "settle_step")


def timed_calls(policy: object) -> dict[str, float]:
    """Wrap ``policy``'s between-step calls (on the instance) to add their seconds into the returned dict."""
    spent = dict.fromkeys(CALLS, 0.0) | {"steps": 0.0}
    for name in CALLS:
        call = getattr(policy, name)

        def timed(*args, call=call, name=name):
            t0 = time.perf_counter()
            out = call(*args)
            spent[name] += time.perf_counter() - t0
            spent["steps"] += name == "settle_step"
            return out

        setattr(policy, name, timed)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--trace", default="benchmarks/traces/demo-eval.npz")
    ap.add_argument("--policies", default="lru,expertflow,expertflow-reuse,moe-infinity")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests, 64, args.max_tokens)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"command": " ".join(sys.argv), "commit": commit, "note": args.note,
                    "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores", "cache_fraction": 0.25,
                    "requests": len(reqs), "max_tokens": args.max_tokens, "runs": []}  # fmt: skip
    for name in args.policies.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            llm = TimedLLM(
                args.model, device="cpu", replay=trace, progress=False, decode="static", compile=False
            )
            llm.reconfigure(policy=name, num_slots=llm.info.num_layers * llm.info.num_experts // 4)
            spent = timed_calls(llm.policy)
            run(llm, reqs, batch, 55e9)
            steps = max(spent.pop("steps"), 1)
            row = {"policy": name, "batch": batch, "steps": int(steps),
                   **{f"{k}_ms": 1e3 * v / steps for k, v in spent.items()},
                   "total_ms_per_step": 1e3 * sum(spent.values()) / steps}  # fmt: skip
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            llm.close()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
