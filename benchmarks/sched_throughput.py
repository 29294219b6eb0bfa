"""Throughput with and without expert-aware token scheduling, replaying recorded routing on a real-geometry model.

All ``--requests`` requests of ``--trace`` are handed to ``LLM.generate`` at once with batch size B; the engine
forms batches FIFO or by predicted routing paths (the predictor saved beside the model). Reports tokens/s and the
mean number of distinct experts each decode step touches per layer. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import sync
from benchmarks.policy_decode import requests_of
from moeflow import LLM, SamplingParams
from moeflow.routing.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--batches", default="4,8,16,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests)
    tokens = min(args.tokens, min(n for _, _, n in reqs))
    llm = LLM(args.model, device=args.device, replay=trace, progress=False)
    slots = int(llm.info.num_layers * llm.info.num_experts * args.fraction)
    result: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                    "policy": args.policy, "fraction": args.fraction, "requests": len(reqs), "tokens": tokens,
                    "runs": []}  # fmt: skip
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        for schedule in ("fifo", "expert"):
            llm.reconfigure(policy=args.policy, num_slots=slots)
            llm.batch_size, llm.config.schedule = batch, schedule
            order = llm.batches(llm._admit([p for _, p, _ in reqs], params, [r for r, _, _ in reqs]))
            sync()
            t0 = time.perf_counter()
            outs = llm.generate([p for _, p, _ in reqs], params, request_ids=[r for r, _, _ in reqs])
            sync()
            wall = time.perf_counter() - t0
            distinct = np.mean([np.mean(d) for d in llm.runtime.distinct if d])
            row = {"batch": batch, "schedule": schedule, "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall,
                   "distinct_experts_per_step_layer": float(distinct), "hit_ratio": llm.policy.stats.hit_ratio,
                   "batches": order}  # fmt: skip
            result["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "batches"}), flush=True)
            Path(args.out).write_text(
                json.dumps(result, indent=2)
            )  # after every row: a timeout keeps the rest
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
