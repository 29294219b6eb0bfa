"""Where decode time goes, per policy: cProfile of the engine thread during replayed decode (prefill excluded from
the per-token figure), plus the routing predictor's own cost per token on this host.

    python benchmarks/profile_decode.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz \
        --policies lru,expertflow,moe-infinity --out /tmp/out/profile-decode.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.policy_decode import TimedLLM, requests_of
from moeflow import SamplingParams
from moeflow.routing.predictor import load_predictor
from moeflow.routing.trace import Trace


def predictor_cost(path: str, tokens: np.ndarray, repeats: int = 200) -> float:
    """Seconds per decode token of the predictor (one token per call, state carried)."""
    pred = load_predictor(path)
    state, prev = pred.init_state(), None
    t0 = time.perf_counter()
    for t in tokens[:repeats]:
        _, state = pred.predict(np.array([t]), state, prev)
    return (time.perf_counter() - t0) / min(repeats, len(tokens))


def profile(llm: TimedLLM, reqs: list, policy: str, slots: int, top: int) -> dict:
    llm.reconfigure(policy=policy, num_slots=slots)
    d0 = dict(llm.decode)
    prof = cProfile.Profile()
    prof.enable()
    for r, p, n in reqs:
        llm.generate([p], SamplingParams(max_tokens=n, ignore_eos=True), request_ids=[r])
    prof.disable()
    d = llm.decode_since(d0)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return {"policy": policy, "decode_ms_per_token": 1e3 * d["wall_s"] / d["tokens"],
            "decode_stall_ms_per_token": 1e3 * d["stall_s"] / d["tokens"],
            "decode_hit_ratio": d["hits"] / max(d["hits"] + d["misses"], 1), "profile": buf.getvalue()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policies", default="lru,expertflow,moe-infinity")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests, 64, 32)
    llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False)
    slots = int(llm.info.num_layers * llm.info.num_experts * args.fraction)
    pred = Path(args.model) / "moeflow" / "predictor.pt"
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "predictor_us_per_token": 1e6 * predictor_cost(str(pred), trace.token[trace.token >= 0]) if pred.exists() else None,
              "runs": []}  # fmt: skip
    print("predictor us/token", result["predictor_us_per_token"], flush=True)
    profile(llm, reqs[:1], "lru", slots, 5)  # warm-up
    for policy in args.policies.split(","):
        row = profile(llm, reqs, policy, slots, args.top)
        result["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        print(row["profile"][:6000], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
