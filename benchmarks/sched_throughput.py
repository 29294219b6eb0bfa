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
from benchmarks.decode_floor import engine_steps
from benchmarks.policy_decode import TimedLLM, requests_of
from moeflow import SamplingParams
from moeflow.routing.trace import Trace


def measure(
    llm: TimedLLM, reqs: list, params: SamplingParams, policy: str, slots: int, batch: int, schedule: str
) -> dict:
    """Generate every request at batch size ``batch``, batches formed by ``schedule``; one result row."""
    llm.reconfigure(policy=policy, num_slots=slots)
    llm.batch_size, llm.config.schedule = batch, schedule
    order = llm.batches(llm._admit([p for _, p, _ in reqs], params, [r for r, _, _ in reqs]))
    d0 = dict(llm.decode)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([p for _, p, _ in reqs], params, request_ids=[r for r, _, _ in reqs])
    sync()
    wall = time.perf_counter() - t0
    d = llm.decode_since(d0)
    n = llm.info
    steps, decode = engine_steps(llm.runtime.replay.trace, [(r, p, params.max_tokens) for r, p, _ in reqs], order,
                                 n.num_experts, n.num_layers)  # fmt: skip
    distinct = np.mean([len(layer) for step, dec in zip(steps, decode) if dec for layer in step])
    row = {"policy": policy, "batch": batch, "schedule": schedule,
           "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall,
           "decode_tokens_per_s": d["tokens"] / d["wall_s"] if d["wall_s"] else 0.0,
           "distinct_experts_per_step_layer": float(distinct), "hit_ratio": llm.policy.stats.hit_ratio,
           "decode_hit_ratio": d["hits"] / max(d["hits"] + d["misses"], 1), "batches": order}  # fmt: skip
    print(json.dumps({k: v for k, v in row.items() if k != "batches"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--batches", default="4,8,16,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--policies", default="lru", help="comma-separated")
    ap.add_argument("--max-prompt", type=int, default=0, help="keep only a prompt's first N tokens (0: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests, args.max_prompt)
    tokens = min(args.tokens, min(n for _, _, n in reqs))
    llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False)
    slots = int(llm.info.num_layers * llm.info.num_experts * args.fraction)
    result: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                    "policies": args.policies, "fraction": args.fraction, "requests": len(reqs), "tokens": tokens,
                    "runs": []}  # fmt: skip
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for policy in args.policies.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for schedule in ("fifo", "expert"):
                result["runs"].append(measure(llm, reqs, params, policy, slots, batch, schedule))
                Path(args.out).write_text(json.dumps(result, indent=2))  # after every row
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
