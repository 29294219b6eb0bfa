"""Decode time per token against its floors, per policy, cache fraction and batch size (one GPU command).

For each configuration: the measured decode ms/token (prefill excluded) with routing replayed from ``--trace``,
and two floors computed in the same run from the measured host->device bandwidth and the all-resident step time:
the policy's own floor (its bytes moved per token / bandwidth + resident time) and Belady's floor (the bytes the
offline optimum would move for the same steps, batched as the engine batched them, / bandwidth + resident time).
A kernel stage first times tile options of the slot-table experts kernel over every layer (from slots,
``benchmarks/kernel_tiles.py``; for each quantised dtype its own kernel and options); the steps then run the fastest
option of their batch size. ``load_s_by_dtype``: wall seconds of building the engine (quantising every expert
included, on the GPU), ``kernel_s_by_dtype``: of the kernel stage.

    python benchmarks/decode_floor.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz \
        --out benchmarks/results/decode-floor-h200.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import h2d_bandwidth
from benchmarks.kernel_tiles import kernel_stage
from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow.experts.quant_proj import precopy_default
from moeflow.routing.trace import Trace


def belady_misses(steps: list[list[set[int]]], slots: int, counted: list[bool]) -> int:
    """Misses of the offline optimum in the steps flagged ``counted`` (the decode steps); a step's accesses are
    taken layer by layer; the cache starts empty."""
    seq = [(i, key) for i, step in enumerate(steps) for layer in step for key in sorted(layer)]
    nxt = [0] * len(seq)
    last: dict[int, int] = {}
    for pos in range(len(seq) - 1, -1, -1):
        nxt[pos] = last.get(seq[pos][1], 1 << 60)
        last[seq[pos][1]] = pos
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    misses = 0
    for pos, (i, key) in enumerate(seq):
        if key not in cache:
            misses += counted[i]
            while len(cache) >= slots:
                nu, victim = heapq.heappop(heap)
                if cache.get(victim) == -nu:
                    del cache[victim]
        cache[key] = nxt[pos]
        heapq.heappush(heap, (-nxt[pos], key))
    return misses


def policy_spec(spec: str) -> tuple[str, dict | None]:
    """``--policies`` entry ``name`` or ``name:key=value:key=value`` (options for that row's policy only, e.g.
    ``expertflow-reuse:bypass=1:vacate=0``): the name and its options (None: the engine's own)."""
    name, *pairs = spec.split(":")
    return name, (dict(p.split("=", 1) for p in pairs) or None)


def engine_steps(
    trace: Trace, reqs: list, batches: list[list[int]], num_experts: int, layers: int
) -> tuple[list, list]:
    """The steps the engine runs for ``reqs`` batched as ``batches`` (indices into ``reqs``; every request of a
    batch generates the batch's fewest tokens, as ``policy_decode.run`` asks): per step and layer, the keys
    (layer * E + expert) used; and which steps decode."""
    index = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(trace.request, trace.position))}
    lmap = np.arange(layers) % trace.num_layers
    steps, decode = [], []
    for members in batches:
        chunk = [reqs[i] for i in members]
        for step in range(min(n for _, _, n in chunk)):
            rows = []
            for rid, prompt, _ in chunk:
                positions = range(len(prompt)) if step == 0 else [len(prompt) + step - 1]
                rows += [index[(rid, p)] for p in positions]
            ex = trace.experts[np.asarray(rows)][:, lmap]  # [T, L, K]
            steps.append(
                [{int(lay * num_experts + e) for e in np.unique(ex[:, lay])} for lay in range(layers)]
            )
            decode.append(step > 0)
    return steps, decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--geometry", default="olmoe")
    ap.add_argument(
        "--policies",
        default="lru,expertflow,moe-infinity",
        help="comma-separated; an entry may carry its own options: name:key=value:key=value",
    )
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--decode", default="graph")
    ap.add_argument(
        "--expert-dtypes", default="bf16", help="e.g. bf16,int4,fp8: one engine and set of rows each"
    )
    ap.add_argument("--no-kernel-stage", action="store_true")
    ap.add_argument(
        "--kernel-dtypes",
        default="",
        help="expert dtypes that get a kernel stage (default: all of --expert-dtypes)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=0, help="start no row after this many seconds (0: no limit)"
    )
    ap.add_argument(
        "--device", default="cuda", help="cpu: a check of the script (--decode static), not a timing"
    )
    ap.add_argument(
        "--precopy", default="auto", help="PRECOPY options of the offloaded rows: auto, 0, 1 or a list (rows carry "
        "'precopy', the value the row ran with): claimed misses copied into their slots before the projections "
        "(experts/precopy.py); auto: the engine's default (quant_proj.precopy_default: on for integer rows)"
    )  # fmt: skip
    ap.add_argument(
        "--overlap-offloaded", default="1", help="0, 1 or 0,1: offloaded rows without / with "
        "EngineConfig.overlap_offloaded (rows carry 'overlap_offloaded'): the next step launched before the last is "
        "settled, on a cache plan one step behind (default 1, as the engine; 0 until session 27, so the quant "
        "stage's rows of decode-floor-quant-s27-h200.json ran without it)"
    )  # fmt: skip
    ap.add_argument(
        "--profile-rows", action="store_true",
        help="each row (resident ones too) also gets a torch-profiler run of its first batch, 8 tokens: device time "
        "per kernel name (row key 'profile'), to see what an offloaded step spends above the resident one",
    )  # fmt: skip
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests, args.max_prompt, args.max_tokens)
    commit = (
        os.environ.get("MOEFLOW_COMMIT")
        or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    )  # the device copy's git metadata can be stale: pass MOEFLOW_COMMIT
    result: dict = {
        "command": " ".join(sys.argv), "commit": commit,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "geometry": args.geometry, "trace": args.trace, "decode": args.decode, "expert_bytes": 0,
        "requests": len(reqs), "h2d_GBps": (h2d_bandwidth() if args.device == "cuda" else 52e9) / 1e9, "resident_ms": {}, "resident_ms_by_dtype": {},
        "kernel": [], "runs": [], "load_s_by_dtype": {}, "kernel_s_by_dtype": {}, "blocks_by_dtype": {},
    }  # fmt: skip
    args.start = time.perf_counter()
    for dtype in args.expert_dtypes.split(","):
        if past_budget(args):
            result.setdefault("skipped", []).append(f"{dtype}: every row")
            continue
        measure(args, trace, reqs, dtype, result)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - args.start
    Path(args.out).write_text(json.dumps(result, indent=2))


def kernel_profile(llm: TimedLLM, reqs: list, batch: int, bw: float, top: int = 14) -> dict:
    """Device time by kernel name over one run of the first ``batch`` requests, 8 tokens each (prefill included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(llm, [(r, p, 8) for r, p, _ in reqs[:batch]], batch, bw)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows)
    kernels = [{"name": e.key[:90], "us": e.self_device_time_total, "calls": e.count} for e in rows[:top]]
    return {"device_us": total, "kernels": kernels}


def past_budget(args: argparse.Namespace) -> bool:
    """More than ``--budget-s`` seconds since the start (a row started now might not finish within the call)."""
    return bool(args.budget_s) and time.perf_counter() - args.start > args.budget_s


def measure(args: argparse.Namespace, trace: Trace, reqs: list, dtype: str, result: dict) -> None:
    """The kernel stage, the resident step and every (fraction, batch, policy) row of one expert dtype, appended to
    ``result`` and written to ``--out`` after each row."""
    quant = (
        {} if dtype == "bf16" else {"expert_dtype": dtype}
    )  # bf16: the checkpoint's own experts, as stored
    t0 = time.perf_counter()
    llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False, decode=args.decode, **quant)
    result["load_s_by_dtype"][dtype] = time.perf_counter() - t0
    result["overlap"] = (
        llm.config.overlap
    )  # the resident rows ran overlapped (engine/overlap.py); offloaded ones as --overlap-offloaded says
    print("load", dtype, f"{result['load_s_by_dtype'][dtype]:.1f} s", flush=True)
    info, bw, out = llm.info, result["h2d_GBps"] * 1e9, Path(args.out)
    total = info.num_layers * info.num_experts
    batches = [int(b) for b in args.batches.split(",")]
    if dtype == "bf16":
        result["expert_bytes"] = info.expert_bytes
    best: dict[int, dict] = {}
    staged = args.kernel_dtypes.split(",") if args.kernel_dtypes else args.expert_dtypes.split(",")
    if dtype in staged and not args.no_kernel_stage and llm.static is not None and args.device == "cuda":
        t0 = time.perf_counter()
        try:
            best, rows = kernel_stage(llm, batches, dtype)
            result["kernel"] += rows
            # the rows below run these
            result["blocks_by_dtype"][dtype] = {str(b): v for b, v in best.items()}
            if dtype == "bf16":
                result["blocks"] = result["blocks_by_dtype"][dtype]  # resident_step.py --blocks reads these
        except Exception as err:  # the floor runs anyway, with the default tiles
            result.setdefault("errors", []).append(f"{dtype} kernel stage: {type(err).__name__}: {err}")
        result["kernel_s_by_dtype"][dtype] = time.perf_counter() - t0

    def warm(policy: str, slots: int, batch: int, precopy: int | None = 0, lagged: int = 0) -> None:
        """Compile the kernels for this shape (Triton specialises on batch and pool sizes) on a short run, then
        start the timed run from a fresh pool of the same size (its graph is captured again; nothing compiles)."""
        if llm.overlap is not None:
            llm.overlap.offloaded = bool(lagged)
        if llm.static is not None:
            llm.static.blocks = {**best.get(batch, {}), **({} if precopy is None else {"PRECOPY": precopy})}
        name, options = policy_spec(policy)
        llm.reconfigure(policy=name, num_slots=slots, options=options)
        run(llm, [(r, p, 3) for r, p, _ in reqs[:batch]], batch, bw)
        llm.reconfigure(policy=name, num_slots=slots, options=options)
        if llm.overlap is not None:
            llm.overlap.stats = type(llm.overlap.stats)()  # the row's own

    resident_ms = result["resident_ms_by_dtype"].setdefault(dtype, {})
    for batch in batches:  # the resident step: every expert in a slot
        warm("lru", total, batch)
        resident_ms[str(batch)] = run(llm, reqs, batch, bw)["decode_ms_per_token"]
        if args.profile_rows and args.device == "cuda":
            result.setdefault("resident_profile", {})[f"{dtype}-{batch}"] = kernel_profile(
                llm, reqs, batch, bw
            )
        if dtype == "bf16":
            result["resident_ms"][str(batch)] = resident_ms[str(batch)]
        print("resident", dtype, batch, resident_ms[str(batch)], flush=True)
        out.write_text(json.dumps(result, indent=2))
    for frac in [float(f) for f in args.fractions.split(",")]:
        slots = max(info.top_k, int(total * frac))
        for batch in batches:
            chunks = [list(range(i, min(i + batch, len(reqs)))) for i in range(0, len(reqs), batch)]
            steps, decode = engine_steps(trace, reqs, chunks, info.num_experts, info.num_layers)
            bel_bytes = belady_misses(steps, slots, decode) * info.expert_bytes
            resident = resident_ms[str(batch)]
            for policy, precopy, lagged in [
                (p, None if c == "auto" else int(c), int(o)) for p in args.policies.split(",")
                for c in args.precopy.split(",")
                for o in args.overlap_offloaded.split(",")
            ]:  # fmt: skip
                if past_budget(args):
                    result.setdefault("skipped", []).append(
                        f"{dtype} {policy} {frac} {batch} precopy {precopy} overlap_offloaded {lagged}"
                    )
                    print("past --budget-s, skipped:", result["skipped"][-1], flush=True)
                    continue
                try:
                    warm(policy, slots, batch, precopy, lagged)
                    row = run(llm, reqs, batch, bw)
                except (
                    Exception
                ) as err:  # a policy that cannot run here (e.g. no predictor for this geometry)
                    result.setdefault("errors", []).append(
                        f"{dtype} {policy} {frac} {batch}: {type(err).__name__}: {err}"
                    )
                    print(result["errors"][-1], flush=True)
                    continue
                tokens = max(row["decode_tokens"], 1)
                bytes_tok = row["decode_MB_per_token"] * 1e6
                result["runs"].append({
                    "geometry": args.geometry, "expert_dtype": dtype, "expert_bytes": info.expert_bytes,
                    "cache_fraction": frac, "policy": policy, "batch": batch,
                    "ms_per_token": row["decode_ms_per_token"], "own_floor_ms": 1e3 * bytes_tok / bw + resident,
                    "belady_floor_ms": 1e3 * bel_bytes / tokens / bw + resident, "hit_ratio": row["decode_hit_ratio"],
                    "bytes_per_token": bytes_tok, "belady_bytes_per_token": bel_bytes / tokens, "slots": slots,
                    "precopy": bool(precopy_default(llm.runtime.store.codec) if precopy is None else precopy),
                    "overlap_offloaded": bool(lagged),
                })  # fmt: skip
                if llm.overlap is not None:
                    result["runs"][-1]["overlap_stats"] = vars(llm.overlap.stats).copy()
                if llm.static is not None:  # a compiled step that failed runs uncompiled from then on
                    result["runs"][-1]["step_fell_back"] = (
                        llm.static.compiled and llm.static.step == llm.static._forward
                    )
                if args.profile_rows and args.device == "cuda":
                    result["runs"][-1]["profile"] = kernel_profile(llm, reqs, batch, bw)
                print(json.dumps(result["runs"][-1]), flush=True)
                out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
