"""Where the static decode step's time goes (one GPU command): the captured graph's device time against the whole
engine step (the rest is host work between steps), the slot-table kernel alone inside a graph for each tile
option (from slots and from host), and the top kernels of one replay under the torch profiler.

    python benchmarks/profile_static.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz --out x.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import event_ms, graph_ms
from benchmarks.kernel_tiles import VARIANTS
from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow.routing.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from moeflow.experts.slot_experts import group_pairs
    from moeflow.experts.slot_kernel import slot_linear

    trace = Trace.load(args.trace)
    reqs = requests_of(trace, 8, 64, 16)  # 8 requests: the batch-8 bucket needs 8 rows
    llm = TimedLLM(args.model, device="cuda", replay=trace, progress=False, decode="graph")
    lm, out = llm.loaded, {"steps": [], "kernel": [], "profile": {}}
    total = llm.info.num_layers * llm.info.num_experts
    llm.reconfigure(policy="lru", num_slots=total)
    for batch in (1, 8):
        run(llm, reqs[:batch], batch, 55e9)
        row = run(llm, reqs[:batch], batch, 55e9)
        bucket = next(b for (rows, _), b in llm.static._buckets.items() if rows == batch)
        replay = event_ms(bucket.graph.replay, 10) if bucket.graph else float("nan")
        out["steps"].append(
            {"batch": batch, "step_ms": row["decode_ms_per_token"] * batch, "replay_ms": replay}
        )
        print(json.dumps(out["steps"][-1]), flush=True)
        if batch == 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    bucket.graph.replay()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
            print(table, flush=True)
            out["profile"]["batch1"] = table
    t = llm.static.table.tensors
    e, k = lm.num_experts, lm.top_k
    off = next(p for p in lm.layout.params if p.name == "gate_up_proj")
    n, d = off.shape
    for source in ("slots", "host"):
        t.table[0] = torch.arange(e, dtype=torch.int32, device="cuda") if source == "slots" else -1
        t.cand.fill_(-1)
        for batch in (1, 8):
            x = torch.randn(batch, d, device="cuda", dtype=lm.dtype)
            ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(batch)])
            groups, slot, claim = group_pairs(t, 0, ids, None)
            y = torch.empty(batch * k, n, device="cuda", dtype=lm.dtype)
            distinct = len(set(ids.flatten().tolist()))
            for v in VARIANTS:
                ms = graph_ms(lambda v=v, x=x, y=y, g=groups, s=slot, c=claim: slot_linear(
                    x, y, g, s, c, t.pool, t.host, 0, (off.offset, d, 1), None, k, False, False, v))  # fmt: skip
                gb = distinct * n * d * lm.dtype.itemsize / ms / 1e6
                out["kernel"].append({"source": source, "batch": batch, **v, "ms": ms, "GBps": gb})
                print(json.dumps(out["kernel"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
