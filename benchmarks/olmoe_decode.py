"""Batch-1 decode on an OLMoE-1B-7B-geometry model (random weights, random per-token routing via replay).

Measures, on a CUDA device: host->device bandwidth (pinned), one MoE layer's expert compute per backend (decode,
8 experts), and end-to-end time per token with a device cache of ``--fraction`` of the experts under LRU, split into
transfer stall and the rest, next to the floor (missed bytes / measured bandwidth + all-resident time per token).
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

from benchmarks.common import h2d_bandwidth
from moeflow import LLM, SamplingParams
from moeflow.experts.compute import run_experts
from moeflow.routing.trace import Trace


def random_trace(requests: int, length: int, layers: int, experts: int, top_k: int, seed: int) -> Trace:
    """Uniform random top-k per token and layer (a random router would send all tokens to the same experts)."""
    rng = np.random.default_rng(seed)
    n = requests * length
    chosen = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :top_k]
    w = rng.random((n, layers, top_k)).astype(np.float32)
    return Trace(
        model="olmoe-random-routing", num_experts=experts, top_k=top_k,
        request=np.repeat(np.arange(requests), length), position=np.tile(np.arange(length), requests),
        decode=np.ones(n, bool), step=np.arange(n), token=np.zeros(n, np.int64), experts=chosen,
        weights=w / w.sum(-1, keepdims=True),
    )  # fmt: skip


def layer_microbench(llm: LLM, backends: list[str]) -> dict:
    """One layer, decode batch 1, 8 experts resident in slots: median ms per backend, and max error vs batched."""
    from triton.testing import do_bench

    module = llm.loaded.layers[0].module
    views = llm.store.views
    hidden = torch.randn(1, llm.loaded.config.hidden_size, device="cuda", dtype=llm.loaded.dtype)
    llm.store.slots[:64].normal_(
        0, 0.02
    )  # nothing is resident yet: fill a few slots with fresh random weights
    slots = torch.randperm(64, device="cuda")[: llm.info.top_k].view(1, -1)
    weights = torch.softmax(torch.randn(1, llm.info.top_k, device="cuda"), -1).to(llm.loaded.dtype)
    ref = run_experts("batched", module, views, hidden, slots, weights).float()
    out = {}
    for b in backends:
        try:
            got = run_experts(b, module, views, hidden, slots, weights).float()
        except RuntimeError as exc:  # e.g. grouped_mm refuses more than 1024 groups (slots)
            out[b] = {"error": str(exc).splitlines()[0]}
            continue
        err = float((got - ref).norm() / ref.norm())
        ms = do_bench(lambda b=b: run_experts(b, module, views, hidden, slots, weights), warmup=50, rep=300,
                      return_mode="median")  # fmt: skip
        out[b] = {"ms": ms, "rel_err_vs_batched": err}
    out["bytes_floor_ms"] = llm.info.top_k * llm.info.expert_bytes / 2.9e12 * 1e3
    return out


def decode_run(llm: LLM, request: int, prompt: list[int], tokens: int) -> dict:
    """Stream one request; per decode step: wall time and transfer stall."""
    llm._next_id = request  # the replay trace is keyed by request id
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    times, stalls = [], []
    last_t, last_s = time.perf_counter(), llm.store.stats.stall_s
    misses0, bytes0 = llm.policy.stats.misses, llm.store.stats.bytes_to_device
    for i, _ in enumerate(llm.stream(prompt, params)):
        torch.cuda.synchronize()
        now, stall = time.perf_counter(), llm.store.stats.stall_s
        if i > 0:  # skip prefill
            times.append(now - last_t)
            stalls.append(stall - last_s)
        last_t, last_s = now, stall
        if i == 0:
            misses0, bytes0 = llm.policy.stats.misses, llm.store.stats.bytes_to_device
    steps = len(times)
    return {
        "decode_steps": steps,
        "ms_per_token": 1e3 * float(np.median(times)),
        "ms_per_token_mean": 1e3 * float(np.mean(times)),
        "stall_ms_per_token": 1e3 * float(np.mean(stalls)),
        "misses_per_token": (llm.policy.stats.misses - misses0) / max(steps, 1),
        "bytes_to_device_per_token": (llm.store.stats.bytes_to_device - bytes0) / max(steps, 1),
        "hit_ratio": llm.policy.stats.hit_ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", required=True, help="OLMoE-geometry checkpoint (made with `moeflow synth` if absent)"
    )
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backends", default="triton,batched,grouped,loop", help="layer microbenchmark backends")
    ap.add_argument("--e2e-backends", default="triton", help="backends timed end to end")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        from moeflow.model.synth import synthesize

        synthesize("olmoe", args.model)
    backends = args.backends.split(",")
    result: dict = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "policy": "lru", "cache_fraction": args.fraction,
        "routing": "uniform random top-k per token and layer (replayed)",
    }  # fmt: skip
    import transformers

    result["transformers"] = transformers.__version__
    bw = h2d_bandwidth()
    result["h2d_GBps"] = bw / 1e9
    prompt = list(range(100, 116))
    length = len(prompt) + args.tokens + 1
    trace = random_trace(8, length, args.layers, args.experts, 8, seed=0)
    llm = LLM(args.model, device="cuda", replay=trace, progress=False)  # every expert gets a slot
    all_slots = llm.store.num_slots
    result["expert_bytes"], result["dense_bytes"] = llm.info.expert_bytes, llm.info.dense_bytes
    result["layer_microbench"] = layer_microbench(llm, backends)
    request = 0
    for backend in args.e2e_backends.split(","):
        llm.runtime.backend = backend
        llm.reconfigure(policy="lru", num_slots=all_slots)
        decode_run(llm, request, prompt, args.tokens)  # warm: loads every expert it meets
        resident = decode_run(llm, request + 1, prompt, args.tokens)
        slots = int(all_slots * args.fraction)
        llm.reconfigure(policy="lru", num_slots=slots)
        decode_run(llm, request + 2, prompt, args.tokens)  # warm the cache with other tokens
        cached = decode_run(llm, request + 3, prompt, args.tokens)
        request += 4
        transfer_floor = cached["bytes_to_device_per_token"] / bw * 1e3
        result[f"backend_{backend}"] = {
            "all_resident": resident, "cached": cached, "slots": slots, "total_experts": all_slots,
            "floor_ms_per_token": transfer_floor + resident["ms_per_token"],
            "transfer_floor_ms_per_token": transfer_floor,
        }  # fmt: skip
        print(backend, json.dumps(result[f"backend_{backend}"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
