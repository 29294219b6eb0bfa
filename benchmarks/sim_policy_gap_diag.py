"""Where the bytes above Belady's go, on the training-split trace only (engine cut, static and eager, batch 1, 25%):
Belady's order under the engine's fill rule with and without emptied slots (``vacate``), and ``expertflow-reuse``
given each request's true future expert frequencies (clairvoyant frequencies: the most any frequency-based victim
order could know). Diagnostics for ``sim_policy_gap.py``; nothing here is a policy.

    python benchmarks/sim_policy_gap_diag.py --out benchmarks/results/sim-policy-gap-diag.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from benchmarks.sim_policy_gap import PREDICTOR, ROOT, TIMING, engine_cut
from moeflow.experts import boundary
from moeflow.experts.cache import Boundary
from moeflow.experts.policies.belady import BeladyPolicy
from moeflow.experts.policies.reuse import ReusePolicy
from moeflow.routing.trace import Trace
from moeflow.sim import simulate

SLOTS = 256  # 25% of 16 x 64


class VacatingBelady(BeladyPolicy):
    """Belady's order; between static steps its best victims' slots are emptied (``vacate`` x recent misses)."""

    vacate = 0.5

    def plan_boundary(self, batch: int) -> Boundary:
        n = min(round(self.vacate * (self._miss_avg or 0.0)), self.fill_budget(batch)) - len(self._free)
        for key in self.select_victims(n, set(), 0) if n > 0 else []:
            self._free.append(self._vacate(key))
        return boundary.plan(self, batch)


def clairvoyant(trace: Trace) -> type[ReusePolicy]:
    """``ReusePolicy`` whose per-request rates are the request's decode rows' true expert frequencies."""
    true = {}
    for rid in trace.requests():
        rows = np.flatnonzero((trace.request == rid) & trace.decode)
        freq = np.zeros((trace.num_layers, trace.num_experts))
        for layer in range(trace.num_layers):
            freq[layer] = np.bincount(trace.experts[rows, layer].ravel(), minlength=trace.num_experts)
        true[rid] = freq / max(len(rows), 1)

    class Clairvoyant(ReusePolicy):
        def request_rates(self, request_ids: tuple[int, ...]) -> np.ndarray:
            g = self.long_run()
            return np.stack([true.get(r, g) for r in request_ids]) if request_ids else self._q[:0]

    return Clairvoyant


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(ROOT / "benchmarks/traces/demo-train-24.npz"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = engine_cut(Trace.load(args.trace))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    runs = [
        ("belady (demand-only optimum)", BeladyPolicy, "eager", {}),
        ("belady order, engine fill rule", BeladyPolicy, "static", {}),
        ("belady order, engine fill rule, vacate 0.5", VacatingBelady, "static", {}),
        ("expertflow-reuse defaults", ReusePolicy, "static", {}),
        ("expertflow-reuse defaults, eager", ReusePolicy, "eager", {}),
        ("expertflow-reuse, clairvoyant frequencies", clairvoyant(trace), "static", {}),
        ("expertflow-reuse, clairvoyant frequencies, eager", clairvoyant(trace), "eager", {}),
    ]
    for label, cls, execution, opts in runs:
        r = simulate(trace, cls, SLOTS, 1, timing=TIMING, execution=execution,
                     options={"predictor": PREDICTOR, **opts})  # fmt: skip
        rows.append({"label": label, "execution": execution, "hit_ratio": round(r.hit_ratio, 4),
                     "loads_per_decode_token": round(r.decode_loads / r.decode_tokens, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    doc = {"command": f"python benchmarks/sim_policy_gap_diag.py --out {args.out}", "commit": commit,
           "trace": args.trace, "cut": "engine", "batch": 1, "slots": SLOTS, "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
