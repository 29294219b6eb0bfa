"""ExpertFlow's headline (about 2x the throughput of an on-demand LRU cache) in the simulator, per model shape, with
the time model set from H100 measurements: what a predictor of today's accuracy gives, and what a perfect one
(the true routing, fed to the same policy) would give.

Shapes: Mixtral-8x7B on the real Mixtral trace (layer 0.584 ms at decode batch 1 and 352 MB per expert, from
``layer-time-mixtral-h100.json``; no trained predictor exists for this trace, which has no token ids, so
"predictor" there is ExpertFlow's frequency fallback), and OLMoE geometry on the demo model's held-out routing
(1.93 ms per layer from ``olmoe-decode-h100.json``, 12.6 MB per expert, the shipped predictor).

    python benchmarks/sim_headline.py --out benchmarks/results/sim-headline.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.routing.predictor import load_predictor
from moeflow.routing.trace import Trace
from moeflow.sim import TimingModel, simulate
from moeflow.sim.simulator import schedule


@dataclass
class _Cfg:
    top_k: int


class OraclePredictor:
    """Returns each token's true routing, in the order the simulator replays the trace at ``batch``."""

    def __init__(self, trace: Trace, batch: int):
        self.shape, self.cfg = (trace.num_layers, trace.num_experts), _Cfg(trace.top_k)
        self.rows = np.concatenate([st.rows for st in schedule(trace, batch)])  # [N] replay order
        self.experts, self.cursor = trace.experts, 0

    def init_state(self) -> np.ndarray:
        return np.zeros(1, np.float32)

    def predict(self, tokens: np.ndarray, state: np.ndarray, prev: np.ndarray | None = None):
        rows = self.rows[self.cursor : self.cursor + len(tokens)]
        self.cursor += len(tokens)
        probs = np.zeros((len(rows), *self.shape), np.float32)  # [T, L, E]
        ex = self.experts[rows]  # [T, L, K]
        t, layer = np.meshgrid(np.arange(len(rows)), np.arange(self.shape[0]), indexing="ij")
        for k in range(ex.shape[2]):
            ok = ex[:, :, k] >= 0
            probs[t[ok], layer[ok], ex[:, :, k][ok]] = 1.0
        return probs, state


SHAPES = {
    "mixtral-8x7b": {"trace": ".data/traces/mixtral.npz", "expert_bytes": 3 * 4096 * 14336 * 2, "layer_ms": 0.584,
                     "predictor": None, "requests": None, "batches": (1, 2)},
    "olmoe-1b-7b": {"trace": "benchmarks/traces/demo-eval.npz", "expert_bytes": 3 * 2048 * 1024 * 2, "layer_ms": 1.93,
                    "predictor": "models/demo/moeflow/predictor.pt", "requests": 12, "batches": (1, 8)},
}  # fmt: skip


def run_shape(name: str, spec: dict, fractions: list[float], bandwidth: float) -> list[dict]:
    trace = Trace.load(spec["trace"])
    if spec["requests"]:
        trace = trace.of_requests(trace.requests()[: spec["requests"]])
    timing = TimingModel(spec["expert_bytes"], bandwidth, spec["layer_ms"] * 1e-3)
    total, rows = trace.num_layers * trace.num_experts, []
    for batch in spec["batches"]:
        for frac in fractions:
            slots = max(trace.top_k, round(total * frac))
            runs = {
                "lru": ("lru", {}),
                "expertflow": ("expertflow", {"predictor": load_predictor(spec["predictor"])} if spec["predictor"] else {}),
                "expertflow-oracle": ("expertflow", {"predictor": OraclePredictor(trace, batch)}),
                "moe-infinity": ("moe-infinity", {}),
                "belady": ("belady", {}),
            }  # fmt: skip
            lru_t = None
            for label, (policy, opts) in runs.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = simulate(trace, policy, slots, batch, timing=timing, options=opts)
                t = res.timing["time_per_token_s"]
                lru_t = t if label == "lru" else lru_t
                row = {"shape": name, "batch": batch, "fraction": frac, "slots": slots, "policy": label,
                       "hit_ratio": res.hit_ratio, "loads_per_token": res.loads / max(res.decode_tokens, 1),
                       "ms_per_token": 1e3 * t, "speedup_vs_lru": lru_t / t,
                       "transfer_hidden_share": res.timing["transfer_hidden_share"]}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--bandwidth", type=float, default=54.7, help="host->device GB/s (measured on the H100)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    result = {"command": "python " + shlex.join(sys.argv), "bandwidth_GBps": args.bandwidth, "shapes": SHAPES,
              "rows": []}  # fmt: skip
    for name in args.shapes.split(","):
        result["rows"] += run_shape(name, SHAPES[name], fractions, args.bandwidth * 1e9)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
