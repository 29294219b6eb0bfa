"""The all-resident decode step and the prefill, against plain transformers (one GPU command).

For the graph decode with the step compiled and not: decode ms/token at each batch size (routing replayed from
``--trace``), the captured graph's replay time alone (the rest of a step is host work between steps), and the
kernel launches per replay under the torch profiler. Then the time to first token of a ``--prompt-tokens`` prompt,
every expert resident, against transformers' own forward on the same GPU (its default experts implementation).

    python benchmarks/resident_step.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz --out x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import event_ms, sync
from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow import LLM, SamplingParams
from moeflow.routing.trace import Trace


def kernels_per_replay(graph: torch.cuda.CUDAGraph) -> tuple[int, list[dict]]:
    """(kernel launches in one replay, the 12 kernels with the most device time) under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:12]
    return len(events), [{"name": e.key[:90], "us": e.self_device_time_total, "calls": e.count} for e in top]


def decode_rows(args: argparse.Namespace, trace: Trace, compiled: bool, overlap: bool = False) -> list[dict]:
    reqs = requests_of(trace, max(args.batches), args.max_prompt, args.max_tokens)
    t0 = time.perf_counter()
    llm = TimedLLM(args.model, device="cuda", replay=trace, progress=False, decode="graph", compile=compiled,
                   overlap=overlap)  # fmt: skip
    total = llm.info.num_layers * llm.info.num_experts
    llm.reconfigure(policy="lru", num_slots=total)
    rows = []
    for batch in args.batches:
        llm.static.blocks = args.blocks.get(str(batch))  # this shape's bucket is made with them
        t1 = time.perf_counter()
        run(llm, [(r, p, 3) for r, p, _ in reqs[:batch]], batch, 55e9)  # compiles and captures this shape
        first = time.perf_counter() - t1
        row = run(llm, reqs[:batch], batch, 55e9)
        bucket = next(b for (n, _), b in llm.static._buckets.items() if n == batch)
        replay = event_ms(bucket.graph.replay, 20, warmup=3)
        launches, top = kernels_per_replay(bucket.graph)
        step = row["decode_ms_per_token"] * batch
        ahead = dataclasses.asdict(llm.overlap.stats) if llm.overlap is not None else None
        rows.append({"compiled": compiled, "overlap": overlap, "overlap_stats": ahead, "batch": batch, "ms_per_token": row["decode_ms_per_token"],
                     "step_ms": step, "replay_ms": replay, "host_ms": step - replay, "kernels_per_replay": launches,
                     "first_run_s": first, "blocks": llm.static.blocks, "top_kernels": top, "step_fell_back": llm.static.step == llm.static._forward})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_kernels"}), flush=True)
    print("engine built and both shapes run in", time.perf_counter() - t0, "s", flush=True)
    del llm
    torch.cuda.empty_cache()
    return rows


PREFILL_TILES = [
    None,  # engine/slot_prefill.py's PREFILL_BLOCKS
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3, "COMPACT": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3, "COMPACT": 1},
]
"""Slot-kernel tiles tried for a prefill through the slot table."""


def _median_ms(fn, reps: int) -> float:
    """Median wall ms of ``fn`` over ``reps`` calls after one untimed call (compiles, first touches)."""
    times = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2]


def ttft(args: argparse.Namespace) -> dict:
    """Median time to first token of one prompt, every expert resident: moeflow with the prefill through the slot
    table (each tile option) and eager (the per-layer path), against transformers' own forward, at each prompt
    length; the headline row is ``--prompt-tokens`` with the default tiles."""
    from transformers import AutoModelForCausalLM

    from moeflow.engine.slot_prefill import PREFILL_BLOCKS

    lengths = sorted({args.prompt_tokens, *args.ttft_lengths})
    prompts = {n: [(7 * i + 3) % 1000 + 10 for i in range(n)] for n in lengths}
    llm = LLM(args.model, device="cuda", progress=False)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    rows: list[dict] = []
    base = llm.config
    for n, prompt in prompts.items():
        for mode, tiles in [("eager", None)] + [("slots", t) for t in PREFILL_TILES]:
            llm.config = dataclasses.replace(base, prefill=mode)
            llm.static.prefill_blocks = dict(tiles or PREFILL_BLOCKS)
            try:
                ms = _median_ms(lambda p=prompt, m=llm: m.generate([p], params), args.reps)
            except Exception as err:  # a tile needing more shared memory than an SM has
                rows.append({"prompt_tokens": n, "prefill": mode, "blocks": tiles, "error": str(err)[:200]})
                continue
            tiles = (tiles or PREFILL_BLOCKS) if mode == "slots" else None
            rows.append({"prompt_tokens": n, "prefill": mode, "blocks": tiles, "moeflow_ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    del llm
    torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda").eval()
    theirs = {}
    with torch.no_grad():
        for n, prompt in prompts.items():
            ids = torch.tensor([prompt], device="cuda")
            theirs[n] = _median_ms(
                lambda ids=ids, m=model: int(m(ids, logits_to_keep=1).logits[0, -1].argmax()), args.reps
            )
    impl = getattr(model.config, "_experts_implementation", None)
    del model
    torch.cuda.empty_cache()
    for row in rows:
        if "moeflow_ms" in row:
            row["transformers_ms"] = theirs[row["prompt_tokens"]]
            row["ratio"] = row["moeflow_ms"] / row["transformers_ms"]
    head = next(
        r
        for r in rows
        if r["prompt_tokens"] == args.prompt_tokens and r["prefill"] == "slots" and "ratio" in r
    )
    best = min(
        (r for r in rows if r["prompt_tokens"] == args.prompt_tokens and "ratio" in r),
        key=lambda r: r["ratio"],
    )
    return {"prompt_tokens": args.prompt_tokens, "moeflow_ms": head["moeflow_ms"], "transformers_ms": head["transformers_ms"],
            "ratio": head["ratio"], "prefill": "slots (default tiles)", "best": best, "rows": rows,
            "transformers_experts_implementation": impl}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--max-prompt", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ttft-lengths", type=lambda s: [int(n) for n in s.split(",")], default=[128, 2048])
    ap.add_argument("--ttft-only", action="store_true", help="skip the decode rows")
    ap.add_argument("--no-ttft", action="store_true", help="skip the time to first token")
    ap.add_argument("--modes", default="compiled,plain",
                    help="decode modes: compiled, plain (not compiled), each with +overlap to overlap the host's "
                    "work between steps (engine/overlap.py)")  # fmt: skip
    ap.add_argument(
        "--blocks",
        type=lambda f: json.loads(Path(f).read_text()).get("blocks", {}) if Path(f).exists() else {},
        default={},
        help="a decode_floor.py result whose kernel stage chose the tile options per batch size",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    trace = Trace.load(args.trace)
    out: dict = {"command": "python benchmarks/resident_step.py " + " ".join(sys.argv[1:]),
                 "device": torch.cuda.get_device_name(), "commit": os.environ.get("MOEFLOW_COMMIT", ""),
                 "torch": torch.__version__, "transformers": transformers.__version__, "decode": []}  # fmt: skip
    path = Path(args.out)
    for mode in [] if args.ttft_only else args.modes.split(","):
        base, _, extra = mode.partition("+")
        out["decode"] += decode_rows(args, trace, base == "compiled", extra == "overlap")
        path.write_text(json.dumps(out, indent=2))
    if not args.no_ttft:
        out["ttft"] = ttft(args)
        print(json.dumps(out["ttft"]), flush=True)
        path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
