"""Serving throughput against offline generation on the same requests (issue 13): aggregate decode tokens/s of
``BatchEngine`` with ``--streams`` concurrent streams against ``LLM.generate`` at batch ``--streams``.

The requests are those of ``--trace`` (prompt token ids, cut to ``--max-prompt`` tokens, the rest replayed as decode),
taken in order and cycled to ``--requests``, each generating ``--max-tokens`` tokens with routing replayed from the
trace (as ``benchmarks/policy_decode.py``), so both modes do the same work:

* ``offline``: ``LLM.generate`` of all requests, ``--streams`` sequences a batch (the engine forms the batches);
* ``serve``: ``BatchEngine`` (``--streams`` rows, chunked prefill) fed by a closed loop of ``--streams`` clients: a
  finished request is replaced by the next at the following step (a request id already running waits its turn);
* ``serve-eager`` (optional): the same on the eager row pool (``BatchEngine(static=False)``);
* ``serve-1`` (optional): batch-1 serving, one stream (one client at a time), over ``--streams`` requests.

Per mode: decode tokens/s (decode steps only: forward, sampling, settling; a serving step's prompt chunks
excluded), end-to-end tokens/s (all generated tokens / wall time, prefill included), mean sequences per decode step,
hit ratio. A warm-up of every mode first (compiles and captures its batch shape). Writes one JSON to ``--out``.

    python3 -m moeflow synth --like olmoe --out /dev/shm/olmoe
    python3 benchmarks/serve_throughput.py --model /dev/shm/olmoe --trace benchmarks/traces/demo-eval.npz \\
        --out benchmarks/results/serve-throughput-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import torch

from benchmarks.common import event_ms, sync
from benchmarks.policy_decode import TimedLLM, requests_of
from moeflow import SamplingParams
from moeflow.engine.batch import BatchEngine, Entry, StepOutput
from moeflow.engine.overlap import Overlap
from moeflow.routing.trace import Trace


class TimedBatch(BatchEngine):
    """``BatchEngine`` plus decode-only totals (its static or eager decode forwards, sampling and settling)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode_s, self.decode_tokens, self.decode_steps = 0.0, 0, 0

    def _timed(self, run, entries: list[Entry]) -> list[StepOutput]:
        t0 = time.perf_counter()
        out = run()  # ends with a host sync (the sampled tokens are read)
        self.decode_s += time.perf_counter() - t0
        self.decode_tokens += len(entries)
        self.decode_steps += 1
        return out

    def _decode(self, entries: list[Entry]) -> list[StepOutput]:
        return self._timed(lambda: super(TimedBatch, self)._decode(entries), entries)

    def _forward(self, entries: list[Entry], counts: list[int]) -> list[StepOutput]:
        if max(counts) > 1 or any(e.prefilled < len(e.seq.prompt_ids) for e in entries):  # prompt chunks
            return super()._forward(entries, counts)
        return self._timed(lambda: super(TimedBatch, self)._forward(entries, counts), entries)


def stats_of(llm: TimedLLM) -> tuple[int, int]:
    return llm.policy.stats.hits, llm.policy.stats.misses


def offline(llm: TimedLLM, reqs: list, streams: int, tokens: int) -> dict:
    llm.batch_size = streams
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    d0, (h0, m0) = dict(llm.decode), stats_of(llm)
    sync()
    t0 = time.perf_counter()
    outs = []
    for start in range(0, len(reqs), streams):  # ids repeat when the requests are cycled: one batch at a time
        chunk = reqs[start : start + streams]
        outs += llm.generate([p for _, p, _ in chunk], params, request_ids=[r for r, _, _ in chunk])
    sync()
    wall = time.perf_counter() - t0
    d, (h, m) = llm.decode_since(d0), stats_of(llm)
    steps = -(-len(reqs) // streams) * (tokens - 1)  # each batch: its first token at the prefill, then decode
    return row(sum(len(o.token_ids) for o in outs), wall, d["tokens"], d["wall_s"], steps, h - h0, m - m0)


def offline_overlapped(llm: TimedLLM, reqs: list, streams: int, tokens: int, on: bool = True) -> dict:
    """``offline`` with the overlapped decode (``EngineConfig.overlap``: step N+1 launched before N is settled)
    on, or (``on=False``) off, whatever the engine's own setting."""
    if llm.static is None:
        raise SystemExit(
            "offline-overlap and offline-serial need the static decode (a GPU, or --decode static)"
        )
    saved, llm.overlap = llm.overlap, Overlap(llm.static, llm.runtime, llm.steps) if on else None
    try:
        return offline(llm, reqs, streams, tokens)
    finally:
        llm.overlap = saved


def serve(llm: TimedLLM, reqs: list, streams: int, tokens: int, chunk: int, static: bool) -> dict:
    engine = TimedBatch(llm, max_batch=streams, prefill_chunk=chunk, static=static)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    queue, generated = deque(reqs), 0
    h0, m0 = stats_of(llm)
    sync()
    t0 = time.perf_counter()
    while queue or engine.has_work:
        inside = set(engine.running) | set(engine.waiting)
        for _ in range(len(queue)):  # the closed loop: a free stream sends the next request
            if len(engine.running) + len(engine.waiting) >= streams:
                break
            r, prompt, _ = queue[0]
            if r in inside:  # its id is still running (requests cycled): the next one goes first
                queue.rotate(-1)
                continue
            queue.popleft()
            engine.add(prompt, params, request_id=r)
            inside.add(r)
        generated += len(engine.step())
    sync()
    wall = time.perf_counter() - t0
    h, m = stats_of(llm)
    return row(generated, wall, engine.decode_tokens, engine.decode_s, engine.decode_steps, h - h0, m - m0)


def row(
    tokens: int, wall: float, dec_tokens: float, dec_s: float, dec_steps: int, hits: int, misses: int
) -> dict:
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "decode_tokens": int(dec_tokens),
            "decode_s": dec_s, "decode_tokens_per_s": dec_tokens / dec_s if dec_s else 0.0,
            "mean_sequences_per_decode_step": dec_tokens / dec_steps if dec_steps else 0.0,
            "hit_ratio": hits / max(hits + misses, 1)}  # fmt: skip


def replay_timeline(events: list) -> dict:
    """Per decode replay of a run: its device time, the host time the step spent before launching it, and the
    device's gap from one replay's end to the next one's start (host work the device waited for, and anything
    queued between two decode steps, such as a prompt chunk's forward). Means, and medians of the gaps."""
    sync()
    dev = [a.elapsed_time(b) for a, b, _ in events]
    gaps = sorted(events[i][1].elapsed_time(events[i + 1][0]) for i in range(len(events) - 1))
    n = max(len(events), 1)
    return {"replays": len(events), "device_ms_mean": sum(dev) / n, "host_before_ms_mean": 1e3 * sum(h for *_, h in events) / n,
            "gap_ms_mean": sum(gaps) / max(len(gaps), 1), "gap_ms_median": gaps[len(gaps) // 2] if gaps else 0.0}  # fmt: skip


def all_live_ms(bucket) -> float:
    """One replay of ``bucket``'s graph with every row live (the state after a run may have few), on the device."""
    saved = bucket.inputs.clone()
    bucket.inputs[2].fill_(1)
    ms = event_ms(bucket.graph.replay, 20, warmup=3)
    bucket.inputs.copy_(saved)
    return ms


def host_profile(fn, top: int = 25) -> list[dict]:
    """The ``top`` functions by own host time while ``fn`` runs (cProfile), with their call counts."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": tt, "cumulative_s": ct}
            for (f, line, name), (_, nc, tt, ct, _) in rows]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="requests in all (the trace's, cycled)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--max-prompt", type=int, default=64, help="keep a prompt's first N tokens (the rest: decode)"
    )
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument(
        "--modes",
        default="offline,serve",
        help="offline (the engine's default decode), offline-overlap, offline-serial, serve, serve-eager, serve-1 (comma-separated)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="measured runs of each mode (interleaved)")
    ap.add_argument("--fraction", type=float, default=None, help="device slots as a share of all experts")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--decode", default=None, help="engine decode mode (default: graph on a GPU, else static)"
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile each mode's host time (cProfile)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    t_start = time.perf_counter()
    trace = Trace.load(args.trace)
    base = requests_of(trace, len(trace.requests()), args.max_prompt, args.max_tokens)
    base = [r for r in base if r[2] >= args.max_tokens]  # every request generates the same number of tokens
    if len(base) < args.streams + 1:
        raise SystemExit(f"{len(base)} trace requests have {args.max_tokens} tokens: fewer than streams + 1")
    reqs = [base[i % len(base)] for i in range(args.requests)]
    options = {"compile": False} if args.no_compile else {}
    decode = args.decode or ("graph" if args.device.startswith("cuda") else "static")
    llm = TimedLLM(args.model, device=args.device, replay=trace, progress=False, decode=decode,
                   batch_size=args.streams, **options)  # fmt: skip
    if args.fraction is not None or args.policy is not None:
        total = llm.info.num_layers * llm.info.num_experts
        slots = max(llm.info.top_k, int(total * args.fraction)) if args.fraction is not None else None
        llm.reconfigure(policy=args.policy, num_slots=slots)
    modes = args.modes.split(",")
    run = {
        "offline": lambda n: offline(llm, reqs[:n], args.streams, args.max_tokens),
        "offline-overlap": lambda n: offline_overlapped(llm, reqs[:n], args.streams, args.max_tokens),
        "offline-serial": lambda n: offline_overlapped(llm, reqs[:n], args.streams, args.max_tokens, False),
        "serve": lambda n: serve(llm, reqs[:n], args.streams, args.max_tokens, args.prefill_chunk, True),
        "serve-eager": lambda n: serve(
            llm, reqs[:n], args.streams, args.max_tokens, args.prefill_chunk, False
        ),
        "serve-1": lambda n: serve(
            llm, reqs[: min(n, args.streams)], 1, args.max_tokens, args.prefill_chunk, True
        ),
    }
    warm = {}
    for mode in modes:  # compiles and captures the batch shape each mode decodes at
        t0 = time.perf_counter()
        run[mode](args.streams)
        warm[mode] = time.perf_counter() - t0
    cuda = llm.device.type == "cuda"
    static = llm.static
    result: dict = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "commit": os.environ.get("MOEFLOW_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout.strip(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": args.model, "model_type": llm.info.model_type, "trace": args.trace,
        "replay_mapping": llm.runtime.replay.mapping or "identity", "streams": args.streams,
        "requests": len(reqs), "max_tokens": args.max_tokens, "max_prompt": args.max_prompt,
        "prefill_chunk": args.prefill_chunk, "policy": type(llm.policy).__name__, "num_slots": llm.store.num_slots,
        "experts": llm.info.num_layers * llm.info.num_experts,
        "decode": "eager" if static is None else ("graph" if static.graphs else "static"),
        "compiled": bool(static is not None and static.compiled), "warmup_s": warm, "runs": [],
    }  # fmt: skip
    for rep in range(args.repeats):
        for mode in modes:
            if cuda and static is not None and static.graphs:
                static.replay_events = []  # per replay: device time, host time before it, the device's gaps
            r = {"mode": mode, "repeat": rep, **run[mode](len(reqs))}
            if static is not None and static.replay_events is not None:
                r["replays"] = replay_timeline(static.replay_events)
                static.replay_events = None
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    best = {m: max((r for r in result["runs"] if r["mode"] == m), key=lambda r: r["decode_tokens_per_s"])
            for m in modes}  # fmt: skip
    if "offline" in best:
        for m in modes:
            if m != "offline":  # offline-overlap too: what overlapping gains offline
                for key in ("decode_tokens_per_s", "tokens_per_s"):
                    result[f"{m}_over_offline_{key}"] = best[m][key] / best["offline"][key]
    if "serve" in best and "offline-overlap" in best:  # against the overlapped offline decode
        result["serve_over_offline_overlap_decode_tokens_per_s"] = (
            best["serve"]["decode_tokens_per_s"] / best["offline-overlap"]["decode_tokens_per_s"]
        )
    if "serve" in best and "serve-1" in best:  # what 32 streams gain over batch-1 serving
        result["serve_over_serve_1_decode_tokens_per_s"] = (
            best["serve"]["decode_tokens_per_s"] / best["serve-1"]["decode_tokens_per_s"]
        )
    if (
        static is not None
    ):  # did a compile fall back, and what does each captured graph cost on the device alone
        result["step_fell_back"] = static.compiled and static.step == static._forward
        result["replay_ms"] = {"x".join(map(str, key)): event_ms(b.graph.replay, 20, warmup=3)
                               for key, b in static._buckets.items() if b.graph is not None and cuda}  # fmt: skip
        result["replay_ms_all_rows_live"] = {"x".join(map(str, key)): all_live_ms(b)
                                             for key, b in static._buckets.items() if b.graph is not None and cuda}  # fmt: skip
    if args.profile:  # where each mode's host time goes (cProfile over a run of --streams requests)
        result["profile"] = {mode: host_profile(lambda m=mode: run[m](args.streams)) for mode in modes}
    result["total_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "_over_" in k or k == "total_s"}))
    llm.close()


if __name__ == "__main__":
    main()
