"""moeflow as one of the peers: each cache policy at the same GPU budgets (dense weights + a fraction of the
experts in device slots), batch 1 and 8, rows appended to the peers JSON.

``--routing replay`` (the default) replays the demo model's recorded routing (``--trace``): its requests' own
prompts (206-483 tokens in demo-eval) and at most ``--gen`` of their recorded decode tokens (63 recorded).
``--routing own`` runs the checkpoint's own router on random ``--prompt``-token prompts, as the other peers do
(random weights route degenerately, which flatters every cache). Decode time excludes prefill; time to first
token is a batch's prefill step (wall time of the whole run minus its decode steps, per batch).

    python3 benchmarks/peers/moeflow_runs.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz \
        --out /tmp/peers.json --fractions 0.25,0.125 --policies lru,lfu,expertflow,moe-infinity
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from benchmarks.common import h2d_bandwidth
from benchmarks.peers.record import add_run, add_skip, set_version
from benchmarks.peers.sizes import checkpoint_sizes
from benchmarks.policy_decode import TimedLLM, requests_of, run
from moeflow.routing.trace import Trace


def own_requests(n: int, prompt: int, gen: int, vocab: int) -> list[tuple[int, list[int], int]]:
    rng = random.Random(0)
    return [(i, [rng.randrange(1, vocab) for _ in range(prompt)], gen) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", default="benchmarks/traces/demo-eval.npz")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--geometry", default="olmoe")
    ap.add_argument("--routing", choices=("replay", "own"), default="replay")
    ap.add_argument("--policies", default="lru,lfu,expertflow,moe-infinity")
    ap.add_argument("--fractions", default="0.25,0.125")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512, help="--routing own: prompt tokens")
    ap.add_argument("--gen", type=int, default=32, help="decode tokens a request")
    ap.add_argument("--decode", default="graph")
    ap.add_argument(
        "--device", default="cuda", help="cpu for a check on a machine without a GPU (--decode eager)"
    )
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds after which nothing new starts")
    args = ap.parse_args()
    import moeflow

    set_version(args.out, "moeflow", getattr(moeflow, "__version__", "source tree"))
    sizes = checkpoint_sizes(Path(args.model))
    trace = Trace.load(args.trace) if args.routing == "replay" else None
    fractions = [float(f) for f in args.fractions.split(",")]
    total = sizes.layers * sizes.num_experts
    first = max(
        8, int(total * fractions[0])
    )  # no all-experts pool at load: its cached blocks would skew peaks
    try:
        llm = TimedLLM(
            args.model, device=args.device, replay=trace, progress=False, decode=args.decode, num_slots=first
        )
    except Exception as e:  # recorded: the other peers still run
        add_skip(args.out, "moeflow", f"engine did not start: {type(e).__name__}: {e}"[:400])
        return
    cuda = args.device.startswith("cuda")
    if trace is not None:
        reqs = requests_of(trace, args.requests, 0, args.gen)
    else:
        reqs = own_requests(args.requests, args.prompt, args.gen, llm.loaded.config.vocab_size)
    prompt_tokens = sum(len(p) for _, p, _ in reqs) / len(reqs)
    bw = h2d_bandwidth() if cuda else 52e9

    def measure(policy: str, slots: int, batch: int) -> dict:
        """Compile for this shape on a short run, then time a run from a fresh pool of the same size."""
        llm.reconfigure(policy=policy, num_slots=slots)
        run(llm, [(r, p, 3) for r, p, _ in reqs[:batch]], batch, bw)
        llm.reconfigure(policy=policy, num_slots=slots)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return run(llm, reqs, batch, bw)

    for frac in fractions:
        slots = max(llm.info.top_k, int(total * frac))
        for batch in [int(b) for b in args.batches.split(",")]:
            for policy in args.policies.split(","):
                system = f"moeflow-{policy}"
                if args.deadline and time.time() > args.deadline - 20:
                    add_skip(args.out, system, f"fraction {frac} batch {batch}: past the deadline")
                    continue
                try:
                    row = measure(policy, slots, batch)
                except Exception as e:  # recorded, then the next configuration
                    add_skip(
                        args.out, system, f"fraction {frac} batch {batch}: {type(e).__name__}: {e}"[:400]
                    )
                    continue
                decode_s = row["decode_ms_per_token"] * row["decode_tokens"] / 1e3
                chunks = -(-len(reqs) // batch)
                add_run(
                    args.out, system=system, geometry=args.geometry, cache_fraction=slots / total,
                    gpu_budget=sizes.dense_bytes + slots * sizes.expert_bytes, batch=batch,
                    prompt_tokens=prompt_tokens, ttft_ms=1e3 * (row["wall_s"] - decode_s) / chunks,
                    ms_per_token=row["decode_ms_per_token"], tokens_per_s=row["decode_tokens_per_s"],
                    step_ms=row["decode_ms_per_token"] * min(batch, len(reqs)), generated_tokens=args.gen,
                    peak_gpu_bytes=torch.cuda.max_memory_reserved() if cuda else 0, hit_ratio=row["decode_hit_ratio"],
                    MB_per_token=row["decode_MB_per_token"], routing=args.routing, slots=slots,
                    notes=f"moeflow decode={args.decode}, {len(reqs)} requests, "
                    + ("routing replayed from " + args.trace if trace is not None else "the checkpoint's own routing")
                    + "; peak_gpu_bytes = torch max_memory_reserved",
                )  # fmt: skip


if __name__ == "__main__":
    main()
