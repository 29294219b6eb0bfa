"""moeflow as one of the peers, under the GPU budget the peers get: ``device_memory`` = dense weights + a fraction
of the experts (``sizes.budget``). Inside it the engine's memory planner fits the KV cache the run needs, a reserve
for activations, scratch and graph pools (``--headroom``) and as many expert slots as are left, so moeflow holds
fewer experts on the GPU than the fraction names (each row records its slots and ``cache_fraction`` = slots / all
experts). Fraction 1.0 is every expert resident, without a device budget (as llama.cpp ``-ngl 99`` and hf-gpu).
Each policy, batch 1 and 8; rows appended to the peers JSON.

One engine per process: the dense weights and the host tier load once, and ``LLM.reconfigure`` gives each
(fraction, batch, policy) the slot pool the planner sized for it (``moeflow.memory.plan_memory`` with that row's
budget and reserve). The engine's static KV check holds the largest reserve of the process.

``--routing replay`` (the default) replays the demo model's recorded routing (``--trace``): its requests' own
prompts (206-483 tokens in demo-eval) and at most ``--gen`` of their recorded decode tokens (63 recorded).
``--routing own`` runs the checkpoint's own router on random ``--prompt``-token prompts, as the other peers do
(random weights route degenerately, which flatters every cache). Decode time excludes prefill; time to first
token is a batch's prefill step (wall time of the whole run minus its decode steps, per batch).

    python3 benchmarks/peers/moeflow_runs.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz \
        --out /tmp/peers.json --fractions 0.25,0.125 --policies lru,lfu,expertflow,moe-infinity

On a CPU (``--device cpu --decode eager`` or ``static``: a check of the script) the budgets are planned the same
way, with no headroom by default (activations are ordinary RAM, as the engine's own CPU default), and no peak is
measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
import transformers

import moeflow
from benchmarks.common import h2d_bandwidth
from benchmarks.peers.record import add_run, add_skip, set_version
from benchmarks.peers.sizes import CheckpointSizes, checkpoint_sizes
from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow.config import parse_size
from moeflow.engine.static import MIN_LEN
from moeflow.memory import MIN_KV_RESERVE, plan_memory
from moeflow.routing.trace import Trace

Request = tuple[int, list[int], int]
KV_BYTES = 2  # the runs compute in bfloat16, so the KV cache holds bf16 keys and values


def own_requests(n: int, prompt: int, gen: int, vocab: int) -> list[Request]:
    rng = random.Random(0)
    return [(i, [rng.randrange(1, vocab) for _ in range(prompt)], gen) for i in range(n)]


def chunks(reqs: list[Request], batch: int) -> list[list[Request]]:
    """The batches ``policy_decode.run`` forms (consecutive requests, each generating its chunk's least count)."""
    return [reqs[i : i + batch] for i in range(0, len(reqs), batch)]


def bucket_shape(chunk: list[Request]) -> tuple[int, int]:
    """(rows, positions) of the static KV bucket a chunk runs in (``StaticDecoder.bucket``'s rounding)."""
    length = max(len(p) for _, p, _ in chunk) + min(n for _, _, n in chunk)
    return len(chunk), max(MIN_LEN, 1 << (length - 1).bit_length())


def kv_bytes(reqs: list[Request], batch: int, sizes: CheckpointSizes) -> int:
    """Static KV bytes a run at ``batch`` allocates: one bucket per distinct shape, all alive until the next
    reconfigure (the eager path's growing cache stays below this)."""
    shapes = {bucket_shape(c) for c in chunks(reqs, batch)}
    return sum(rows * positions for rows, positions in shapes) * sizes.kv_values_per_token * KV_BYTES


def warmup_requests(reqs: list[Request], batch: int) -> list[Request]:
    """One chunk per distinct bucket shape of the timed run, in full, so that no shape's graph capture (or
    compilation) falls inside the timed run."""
    out, seen = [], set()
    for c in chunks(reqs, batch):
        if bucket_shape(c) not in seen:
            seen.add(bucket_shape(c))
            out += c
    return out


def planned_slots(llm: TimedLLM, budget: int, reserve: int) -> int:
    """The engine's own plan of expert slots for ``budget`` bytes, ``reserve`` of them kept for KV and activations."""
    cfg = dataclasses.replace(llm.config, device_memory=budget, kv_reserve=reserve, num_slots=None)
    return plan_memory(llm.loaded, cfg).num_slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", default="benchmarks/traces/demo-eval.npz")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--geometry", default="olmoe")
    ap.add_argument("--routing", choices=("replay", "own"), default="replay")
    ap.add_argument("--policies", default="lru,lfu,expertflow,moe-infinity")
    ap.add_argument("--fractions", default="0.25,0.125", help="1.0: every expert resident, no device budget")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512, help="--routing own: prompt tokens")
    ap.add_argument("--gen", type=int, default=32, help="decode tokens a request")
    ap.add_argument("--decode", default="graph")
    ap.add_argument("--headroom", default=None, help="device bytes beside weights and KV for activations, scratch "
                    "and graph pools (default: moeflow.memory.MIN_KV_RESERVE, 256 MiB; 0 on a CPU)")  # fmt: skip
    ap.add_argument(
        "--device", default="cuda", help="cpu for a check on a machine without a GPU (--decode eager)"
    )
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds after which nothing new starts")
    args = ap.parse_args()
    set_version(args.out, "moeflow", getattr(moeflow, "__version__", "source tree"))
    set_version(args.out, "torch", torch.__version__)
    set_version(args.out, "transformers", transformers.__version__)
    cuda = args.device.startswith("cuda")
    headroom = parse_size(args.headroom) if args.headroom is not None else (MIN_KV_RESERVE if cuda else 0)
    sizes = checkpoint_sizes(Path(args.model))
    trace = Trace.load(args.trace) if args.routing == "replay" else None
    fractions = [float(f) for f in args.fractions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    total = sizes.layers * sizes.num_experts
    if trace is not None:
        reqs = requests_of(trace, args.requests, 0, args.gen)
    else:
        config = json.loads((Path(args.model) / "config.json").read_text())
        vocab = config.get("text_config", config)["vocab_size"]
        reqs = own_requests(args.requests, args.prompt, args.gen, vocab)
    kv = {b: kv_bytes(reqs, b, sizes) for b in batches}
    budgeted = [f for f in fractions if f < 1]
    # the engine starts inside the largest budget with the largest reserve (never with an all-experts pool: its
    # cached blocks would stay with the allocator); each row then gets the pool its own plan sizes
    start = (dict(device_memory=sizes.budget(max(budgeted)), kv_reserve=max(kv.values()) + headroom)
             if budgeted else dict(num_slots=total))  # fmt: skip
    try:
        llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False, decode=args.decode,
                       dtype="bfloat16", **start)  # fmt: skip
    except Exception as e:  # recorded: the other peers still run
        add_skip(args.out, "moeflow", f"engine did not start: {type(e).__name__}: {e}"[:400])
        return
    prompt_tokens = sum(len(p) for _, p, _ in reqs) / len(reqs)
    bw = h2d_bandwidth() if cuda else 52e9

    def measure(policy: str, slots: int, batch: int) -> dict:
        """Capture (and compile) every batch shape on a warm-up run, then time a run from a fresh pool."""
        llm.reconfigure(policy=policy, num_slots=slots)
        run(llm, warmup_requests(reqs, batch), batch, bw)
        llm.reconfigure(policy=policy, num_slots=slots)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return run(llm, reqs, batch, bw)

    for frac in fractions:
        for batch in batches:
            budget = sizes.budget(frac) if frac < 1 else None
            reserve = kv[batch] + headroom
            for policy in args.policies.split(","):
                system, where = f"moeflow-{policy}", f"fraction {frac} batch {batch}"
                if args.deadline and time.time() > args.deadline - 20:
                    add_skip(args.out, system, f"{where}: past the deadline")
                    continue
                try:
                    slots = planned_slots(llm, budget, reserve) if budget is not None else total
                    row = measure(policy, slots, batch)
                except Exception as e:  # recorded, then the next configuration
                    add_skip(args.out, system, f"{where}: {type(e).__name__}: {e}"[:400])
                    continue
                peak = torch.cuda.max_memory_allocated() if cuda else 0
                decode_s = row["decode_ms_per_token"] * row["decode_tokens"] / 1e3
                if budget is None:
                    plan = "no device budget: every expert resident (as llama.cpp -ngl 99 and hf-gpu)"
                else:
                    plan = (f"device_memory = gpu_budget (dense + {frac:g} of the experts); the engine's plan put "
                            f"the KV cache ({kv[batch] / 2**20:.0f} MiB, as the static decode's buckets size it) + "
                            f"{headroom / 2**20:.0f} MiB for activations, scratch and graph pools, and {slots} expert slots inside it")  # fmt: skip
                peaks = ("peak_gpu_bytes = torch.cuda.max_memory_allocated over the timed run (weights, slots, KV, "
                         "activations, graph pools), peak_gpu_reserved_bytes = max_memory_reserved; neither counts "
                         "the CUDA context" if cuda else "CPU check: no GPU peak measured")  # fmt: skip
                add_run(
                    args.out, system=system, geometry=args.geometry, cache_fraction=slots / total,
                    budget_fraction=frac, gpu_budget=sizes.budget(frac), device_memory=budget, batch=batch,
                    prompt_tokens=prompt_tokens, ttft_ms=1e3 * (row["wall_s"] - decode_s) / len(chunks(reqs, batch)),
                    ms_per_token=row["decode_ms_per_token"], tokens_per_s=row["decode_tokens_per_s"],
                    step_ms=row["decode_ms_per_token"] * min(batch, len(reqs)), generated_tokens=args.gen,
                    peak_gpu_bytes=peak, peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else 0,
                    within_budget=(peak <= budget) if cuda and budget is not None else None,
                    kv_bytes=kv[batch], kv_reserve=reserve if budget is not None else None,
                    engine_dense_bytes=llm.info.dense_bytes, hit_ratio=row["decode_hit_ratio"],
                    MB_per_token=row["decode_MB_per_token"], routing=args.routing, slots=slots,
                    notes=f"moeflow decode={args.decode}, {len(reqs)} requests, "
                    + ("routing replayed from " + args.trace if trace is not None else "the checkpoint's own routing")
                    + f"; {plan}; {peaks}",
                )  # fmt: skip


if __name__ == "__main__":
    main()
