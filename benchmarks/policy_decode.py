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


def requests_of(
    trace: Trace, limit: int, max_prompt: int = 0, max_tokens: int = 0
) -> list[tuple[int, list[int], int]]:
    """(request id, prompt token ids, tokens to generate) for up to ``limit`` requests of the trace. ``max_prompt``
    keeps a prompt's first tokens only (their routing is the recorded one); a decode-only trace (imported logs)
    gets its first token as a one-token prompt. ``max_tokens`` caps the tokens generated (0: all recorded)."""
    out = []
    for r in trace.requests()[:limit]:
        rows = trace.request == r
        pre = rows & ~trace.decode
        if not pre.any():  # decode-only trace: the first recorded token stands in for the prompt
            pre = rows & (trace.position == trace.position[rows].min())
        order = np.argsort(trace.position[pre])
        prompt = np.maximum(trace.token[pre][order], 0).tolist()
        if max_prompt and len(prompt) > max_prompt:
            prompt = prompt[:max_prompt]  # the rest of the prompt is replayed as decode steps
        n = int(rows.sum()) - len(prompt) + 1
        out.append((r, prompt, min(n, max_tokens) if max_tokens else n))
    return out


class TimedLLM(LLM):
    """The engine, plus decode-only totals: wall time, tokens, hits, misses, bytes and stall of decode steps (the
    prefill step is excluded: its cost depends on prompt length, not on the cache policy's decode behaviour)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode = dict.fromkeys(("wall_s", "tokens", "hits", "misses", "bytes", "stall_s"), 0.0)

    def decode_since(self, before: dict) -> dict:
        """Decode totals accumulated since ``before`` (a copy of ``self.decode``)."""
        return {k: self.decode[k] - before[k] for k in before}

    def step(self, seqs, batch, gen):  # type: ignore[override]
        live = sum(not s.finished for s in seqs)
        decoding = batch.decoding
        p, s = self.policy.stats, self.store.stats
        before = (p.hits, p.misses, s.bytes_to_device, s.stall_s)
        t0 = time.perf_counter()
        super().step(seqs, batch, gen)  # ends with a host sync (sampling)
        if decoding:
            d = self.decode
            d["wall_s"] += time.perf_counter() - t0
            d["tokens"] += live
            for key, b, a in zip(
                ("hits", "misses", "bytes", "stall_s"),
                before,
                (p.hits, p.misses, s.bytes_to_device, s.stall_s),
            ):
                d[key] += a - b


def run(llm: TimedLLM, reqs: list, batch: int, bw: float) -> dict:
    llm.batch_size = batch
    p0, s0 = llm.policy.stats, llm.store.stats
    h0, m0, b0, st0 = p0.hits, p0.misses, s0.bytes_to_device, s0.stall_s
    d0 = dict(llm.decode)
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
    d = llm.decode_since(d0)
    dec_tokens = max(d["tokens"], 1)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "hit_ratio": hits / max(hits + misses, 1),
        "bytes_to_device": moved,
        "stall_s": stall,
        "decode_tokens": int(d["tokens"]),
        "decode_ms_per_token": 1e3 * d["wall_s"] / dec_tokens,
        "decode_tokens_per_s": d["tokens"] / d["wall_s"] if d["wall_s"] else 0.0,
        "decode_hit_ratio": d["hits"] / max(d["hits"] + d["misses"], 1),
        "decode_MB_per_token": d["bytes"] / dec_tokens / 1e6,
        "decode_stall_ms_per_token": 1e3 * d["stall_s"] / dec_tokens,
        "decode_transfer_ms_per_token": 1e3 * d["bytes"] / bw / dec_tokens,
        "decode_transfer_hidden_share": 1 - d["stall_s"] / (d["bytes"] / bw) if d["bytes"] else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policies", default="lru,moe-infinity,expertflow")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=0, help="keep only a prompt's first N tokens (0: all)")
    ap.add_argument(
        "--max-tokens", type=int, default=0, help="generate at most N tokens a request (0: all recorded)"
    )
    ap.add_argument("--option", action="append", default=[], help="policy option KEY=VALUE (repeatable)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    trace = Trace.load(args.trace)
    reqs = requests_of(trace, args.requests, args.max_prompt, args.max_tokens)
    options = dict(kv.split("=", 1) for kv in args.option)
    llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False, extra=options)
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
