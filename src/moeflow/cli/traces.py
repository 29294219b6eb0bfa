"""Trace commands: ``trace`` (record while generating), ``trace-stats``, ``trace-import`` and ``synth``
(a random-weight checkpoint of a real family's geometry, for replay benchmarks)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm.auto import tqdm

from moeflow.cli.args import cache_sizes, int_at_least, size
from moeflow.cli.sim import require_matplotlib


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="record routing traces while generating")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompts", required=True, help="prompt file: one per line (\\n = line break) or .jsonl")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=64, help="tokens to generate per prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument(
        "--device-memory", type=size, default=None, help="device budget, e.g. 12GiB (default: what fits)"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences decoded together")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_trace)

    p = subparsers.add_parser("trace-stats", help="routing statistics of a trace, next to random routing")
    p.add_argument("trace", help="trace file (.npz)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--plot", metavar="PNG", help="also write a heat-map and the curves to this PNG")
    p.add_argument(
        "--cache-size", "--cache-sizes", dest="cache_size", type=cache_sizes, nargs="+", default=None,
        help="LRU cache sizes over all MoE layers, as in simulate: shares (0.25, 25%%) or slot counts (64), "
        "split evenly over the layers (default: k, 2k, E/4, E/2, 3E/4 per layer)",
    )  # fmt: skip
    p.set_defaults(func=cmd_trace_stats)

    p = subparsers.add_parser("trace-import", help="convert a JSON-lines routing log into a trace")
    p.add_argument("jsonl", help="log with problem_id, token_idx, layer, experts, gating_probs per line")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument(
        "--model", default=None, help="model name stored in the trace (default: the log's file name)"
    )
    p.add_argument(
        "--num-experts",
        type=int_at_least(1),
        default=None,
        help="experts per layer (default: largest id + 1)",
    )
    p.set_defaults(func=cmd_trace_import)

    p = subparsers.add_parser(
        "synth", help="write a random-weight checkpoint with a real MoE family's geometry"
    )
    p.add_argument(
        "--like", required=True, choices=("olmoe", "qwen3-30b", "mixtral"), help="geometry to copy"
    )
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument(
        "--layers", type=int_at_least(1), default=None, help="keep only the first N layers (default: all)"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="weight dtype"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_synth)


def cmd_trace(args: argparse.Namespace) -> int:
    from moeflow import LLM, SamplingParams
    from moeflow.cli.prompts import read_prompts

    prompts = read_prompts(args.prompts)
    llm = LLM(
        args.model,
        device=args.device,
        device_memory=args.device_memory,
        record_trace=True,
        batch_size=args.batch_size,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        chunks = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
        bar = tqdm(
            total=len(prompts), desc="trace", unit="prompt", disable=args.quiet or not sys.stderr.isatty()
        )
        try:
            for chunk in chunks:
                llm.generate(chunk, params)
                bar.update(len(chunk))
        except KeyboardInterrupt:
            bar.close()
            if llm.runtime.recorder.steps == 0:
                print("moeflow: interrupted before a step was recorded; no trace written", file=sys.stderr)
                return 130
            trace = llm.trace()
            trace.save(args.out)  # atomic: a second Ctrl-C leaves the old file or none, never half of one
            print(
                f"moeflow: interrupted; wrote the partial trace {args.out} ({trace.num_tokens} tokens)",
                file=sys.stderr,
            )
            return 130
        bar.close()
        trace = llm.trace()
        trace.save(args.out)
        print(
            f"wrote {args.out}: {trace.num_tokens} tokens ({int(trace.decode.sum())} decode) of {len(prompts)} prompts, "
            f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}"
        )
        return 0
    finally:
        llm.close()  # the policy saves what it learned


def per_layer_sizes(sizes: list[list[Any]] | None, trace: Any) -> list[int] | None:
    """``--cache-size`` values (all layers together, as everywhere) as per-layer LRU sizes for ``trace_stats``."""
    if sizes is None:
        return None
    total = trace.num_layers * trace.num_experts
    return [
        max(1, round(c.slots(total, 1, "--cache-size") / trace.num_layers)) for group in sizes for c in group
    ]


def cmd_trace_import(args: argparse.Namespace) -> int:
    from moeflow.routing.importer import import_jsonl_with_report

    trace, report = import_jsonl_with_report(args.jsonl, model=args.model, num_experts=args.num_experts)
    trace.save(args.out)
    print(
        f"wrote {args.out}: {report.tokens_kept} tokens from {report.rows} rows "
        f"({report.tokens_skipped} tokens skipped for missing layers), {trace.num_layers} layers, "
        f"{trace.num_experts} experts, top-{trace.top_k}"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:.3f}"


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table: one row per layer, then mean / min / max over layers and the random-routing value."""
    names: list[str] = stats["stats"]
    short = {
        "entropy_ratio": "entropy",
        "top_share": "top-use",
        "first_repeat": "rep-1st",
        "any_repeat": "rep-any",
        "next_layer_first": "next-l",
    }
    heads = [short.get(n, n.replace("lru_hit_", "lru@")) for n in names]
    width = max(7, *(len(h) for h in heads))
    lines = [
        f"{stats['model']}: {stats['num_tokens']} tokens ({stats['num_decode_tokens']} decode), "
        f"{stats['num_requests']} requests, {stats['consecutive_pairs']} consecutive pairs; "
        f"{stats['num_layers']} MoE layers, {stats['num_experts']} experts, top-{stats['top_k']}",
        "entropy = usage entropy/log2(E); top-use = share of most-used expert; rep-1st / rep-any = consecutive "
        "tokens with the same first choice / a shared expert; next-l = next layer's first choice guessed "
        "(held-out half); lru@c = per-layer LRU hit ratio with c experts cached",
        "",
        "layer  " + " ".join(h.rjust(width) for h in heads),
    ]
    for row in stats["layers"]:
        lines.append(f"{row['layer']:>5}  " + " ".join(_fmt(row[n]).rjust(width) for n in names))
    lines.append("")
    for label in ("mean", "min", "max", "random"):
        lines.append(f"{label:>6} " + " ".join(_fmt(stats["overall"][n][label]).rjust(width) for n in names))
    return "\n".join(lines)


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from moeflow.routing.stats import trace_stats
    from moeflow.routing.trace import Trace

    if args.plot:
        require_matplotlib()
    trace = Trace.load(args.trace)
    stats = trace_stats(trace, per_layer_sizes(args.cache_size, trace))
    if args.json:
        json.dump(stats, sys.stdout, indent=1)
        print()
    else:
        print(format_stats(stats))
    if args.plot:
        from moeflow.routing.plot import plot_trace

        out = plot_trace(trace, stats, args.plot)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from moeflow.model.synth import synthesize

    out = synthesize(args.like, args.out, num_layers=args.layers, dtype=args.dtype, seed=args.seed)
    print(f"wrote {out} (random weights, no tokenizer: drive it with token ids or replayed traces)")
    return 0
