"""End-to-end decode on a real-geometry model driven by recorded routing (replay), per policy and cache size.

For each policy × cache fraction × batch size: replays every request of ``--trace`` (its prompt token ids and its
recorded number of decode tokens) through the engine with routing taken from the trace, and reports time per
output token, hit ratio, transfer stall, bytes moved, and the share of transfer time hidden behind compute
(1 − stall / (bytes moved / measured host→device bandwidth)). Batch > 1 optionally uses expert-aware scheduling.
Writes one JSON (device, versions, command, numbers) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import h2d_bandwidth, sync
from moeflow import LLM, SamplingParams
from moeflow.routing.trace import Trace


def requests_of(trace: Trace, limit: int) -> list[tuple[int, list[int], int]]:
    """(request id, prompt token ids, decode tokens) for up to ``limit`` requests of the trace."""
    out = []
    for r in trace.requests()[:limit]:
        rows = trace.request == r
        pre = rows & ~trace.decode
        order = np.argsort(trace.position[pre])
        prompt = trace.token[pre][order].tolist()
        out.append((r, prompt, int((rows & trace.decode).sum()) + 1))
    return out


def run(llm: LLM, reqs: list, batch: int, bw: float) -> dict:
    llm.batch_size = batch
    p0, s0 = llm.policy.stats, llm.store.stats
    h0, m0, b0, st0 = p0.hits, p0.misses, s0.bytes_to_device, s0.stall_s
    sync()
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(reqs), batch):
        chunk = reqs[start : start + batch]
        params = SamplingParams(max_tokens=min(n for _, _, n in chunk), ignore_eos=True)
        outs = llm.generate([p for _, p, _ in chunk], params, request_ids=[r for r, _, _ in chunk])
        tokens += sum(len(o.token_ids) for o in outs)
    sync()
    wall = time.perf_counter() - t0
    p, s = llm.policy.stats, llm.store.stats
    moved, stall = s.bytes_to_device - b0, s.stall_s - st0
    hits, misses = p.hits - h0, p.misses - m0
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ms_per_token": 1e3 * wall / tokens,
        "hit_ratio": hits / max(hits + misses, 1),
        "bytes_to_device": moved,
        "stall_s": stall,
        "transfer_hidden_share": 1 - stall / (moved / bw) if moved else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policies", default="lru,moe-infinity,expertflow")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--option", action="append", default=[], help="policy option KEY=VALUE (repeatable)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests)
    options = dict(kv.split("=", 1) for kv in args.option)
    llm = LLM(args.model, device=args.device, replay=trace, progress=False, extra=options)
    total = llm.info.num_layers * llm.info.num_experts
    bw = h2d_bandwidth() if args.device == "cuda" else 52e9
    result: dict = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "h2d_GBps": bw / 1e9,
        "trace": args.trace, "trace_model": trace.model, "replay_mapping": llm.runtime.replay.mapping or "identity",
        "requests": len(reqs), "runs": [],
    }  # fmt: skip
    run(llm, reqs[:2], 1, bw)  # warm-up: kernels, allocator
    for frac in [float(f) for f in args.fractions.split(",")]:
        for policy in args.policies.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                llm.reconfigure(
                    policy=policy, num_slots=max(llm.info.top_k, int(total * frac)), options=options
                )
                row = {"policy": policy, "fraction": frac, "batch": batch, **run(llm, reqs, batch, bw)}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=2))  # after every row
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
