"""The all-resident decode step and the prefill, against plain transformers (one GPU command).

For the graph decode with the step compiled and not: decode ms/token at each batch size (routing replayed from
``--trace``), the captured graph's replay time alone (the rest of a step is host work between steps), and the
kernel launches per replay under the torch profiler. Then the time to first token of a ``--prompt-tokens`` prompt,
every expert resident, against transformers' own forward on the same GPU (its default experts implementation).

    python benchmarks/resident_step.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz --out x.json
"""

from __future__ import annotations

import argparse
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


def decode_rows(args: argparse.Namespace, trace: Trace, compiled: bool) -> list[dict]:
    reqs = requests_of(trace, max(args.batches), args.max_prompt, args.max_tokens)
    t0 = time.perf_counter()
    llm = TimedLLM(args.model, device="cuda", replay=trace, progress=False, decode="graph", compile=compiled)
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
        rows.append({"compiled": compiled, "batch": batch, "ms_per_token": row["decode_ms_per_token"],
                     "step_ms": step, "replay_ms": replay, "host_ms": step - replay, "kernels_per_replay": launches,
                     "first_run_s": first, "blocks": llm.static.blocks, "top_kernels": top, "step_fell_back": llm.static.step == llm.static._forward})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_kernels"}), flush=True)
    print("engine built and both shapes run in", time.perf_counter() - t0, "s", flush=True)
    del llm
    torch.cuda.empty_cache()
    return rows


def ttft(args: argparse.Namespace) -> dict:
    """Median prefill-to-first-token time of one prompt: moeflow (all resident) and transformers' own forward."""
    from transformers import AutoModelForCausalLM

    prompt = [(7 * i + 3) % 1000 + 10 for i in range(args.prompt_tokens)]
    llm = LLM(args.model, device="cuda", progress=False)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(args.reps + 1):
        sync()
        t0 = time.perf_counter()
        llm.generate([prompt], params)
        sync()
        times.append(time.perf_counter() - t0)
    ours = sorted(times[1:])[len(times[1:]) // 2]
    del llm
    torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor([prompt], device="cuda")
    times = []
    with torch.no_grad():
        for _ in range(args.reps + 1):
            sync()
            t0 = time.perf_counter()
            int(model(ids, logits_to_keep=1).logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
    theirs = sorted(times[1:])[len(times[1:]) // 2]
    impl = getattr(model.config, "_experts_implementation", None)
    del model
    torch.cuda.empty_cache()
    return {"prompt_tokens": args.prompt_tokens, "moeflow_ms": 1e3 * ours, "transformers_ms": 1e3 * theirs,
            "ratio": ours / theirs, "transformers_experts_implementation": impl}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--max-prompt", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default="compiled,plain")
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
    for mode in args.modes.split(","):
        out["decode"] += decode_rows(args, trace, mode == "compiled")
        path.write_text(json.dumps(out, indent=2))
    out["ttft"] = ttft(args)
    print(json.dumps(out["ttft"]), flush=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
