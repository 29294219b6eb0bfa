"""Host time of the cache policies' bookkeeping per MoE layer (pure Python/NumPy, no device): at Qwen3-30B-A3B
shape (48 layers x 128 experts, top-8), 25% of the experts cached, random routing, decode batch 1 and 8.

    python benchmarks/policy_host_time.py --out benchmarks/results/policy-host-time-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies import make_policy


def per_layer_us(
    name: str, layers: int, experts: int, top_k: int, slots: int, batch: int, steps: int
) -> float:
    """Median microseconds of one layer's ``observe`` + ``request`` + ``prefetch`` over ``steps`` timed steps."""
    rng = np.random.default_rng(0)
    pol = make_policy(name)
    pol.bind(slots, layers, experts, top_k)
    pol.setup(PolicyContext(options={"batch_size": batch}))
    times = []
    for step in range(steps + 8):  # 8 warm-up steps fill the pool
        pol.begin_step(
            StepInfo(step, tuple(range(batch)), tuple((1,) for _ in range(batch)), (0,) * batch, False)
        )
        for layer in range(layers):
            routed = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(batch)])  # [T, K]
            t0 = time.perf_counter()
            pol.observe(layer, routed, None)
            pol.request(layer, np.unique(routed).tolist())
            pol.prefetch(layer)
            if step >= 8:
                times.append(time.perf_counter() - t0)
        pol.end_step()
    return float(np.median(times) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", default="lru,lfu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    layers, experts, top_k = 48, 128, 8
    slots = layers * experts // 4
    rows = []
    for name in args.policies.split(","):
        for batch in (1, 8):
            us = per_layer_us(name, layers, experts, top_k, slots, batch, args.steps)
            rows.append({"policy": name, "batch": batch, "us_per_layer": us})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"command": " ".join(sys.argv), "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores",
           "shape": {"layers": layers, "experts": experts, "top_k": top_k, "slots": slots}, "runs": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
