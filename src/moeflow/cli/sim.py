"""Simulation commands: ``simulate`` (replay a trace through cache policies) and ``eamc build`` (an EAM
collection for MoE-Infinity from recorded traces)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moeflow.cli.args import cache_sizes, int_at_least, number, parse_options, size
from moeflow.config import format_size
from moeflow.errors import MoeflowError, TraceError
from moeflow.sim.timing import DEFAULT_BANDWIDTH, DEFAULT_COMPUTE_PER_LAYER
from moeflow.validate import DTYPES

DEFAULT_POLICIES = "lru,lfu,moe-infinity,belady"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="replay a routing trace through cache policies")
    p.add_argument("--trace", required=True, help="trace file (.npz, or a .jsonl routing log)")
    p.add_argument(
        "--cache-size", type=cache_sizes, nargs="+", required=True,
        help="device slots over all MoE layers: shares of all experts (0.25 or 25%%) or slot counts (64); several "
        "sizes separated by spaces or commas",
    )  # fmt: skip
    p.add_argument("--policy", default=DEFAULT_POLICIES, help="comma-separated cache policies")
    p.add_argument(
        "--batch-size", type=int_at_least(1), nargs="+", default=[1], help="sequences decoded together"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--eamc", help="EAM collection file for moe-infinity (built with `moeflow eamc build`)"
    )
    group.add_argument(
        "--eamc-from", nargs="+", metavar="TRACE", help="build the EAM collection from these traces"
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    p.add_argument(
        "--expert-bytes", type=size, default=None, help="bytes per expert, e.g. 336MiB (or give --model-dir)"
    )
    p.add_argument("--model-dir", default=None, help="checkpoint whose geometry gives the bytes per expert")
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="dtype of the experts copied with --model-dir (auto: what the engine moves to a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--bandwidth", type=number(0, lo_open=True), default=DEFAULT_BANDWIDTH / 1e9, help="host->device GB/s"
    )
    p.add_argument(
        "--compute-per-layer-ms",
        type=number(0),
        default=DEFAULT_COMPUTE_PER_LAYER * 1e3,
        help="compute per layer (ms)",
    )
    p.add_argument(
        "--execution", default="eager", choices=("eager", "static", "static-overlap"),
        help="how decode steps run: eager (demand loads per layer), static (the graph decode's boundaries, "
        "zero-copy misses and read-through fills) or static-overlap (static with each plan made one step behind, as "
        "the engine's default offloaded overlap runs)",
    )  # fmt: skip
    p.add_argument(
        "--batching", default="continuous", choices=("continuous", "recorded"),
        help="continuous (requests join as others finish) or recorded (the trace's own steps, as the engine ran them)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=None, help="also write the JSON results to this file")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="draw hit ratio against cache size (needs matplotlib)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    e = subparsers.add_parser("eamc", help="EAM collections (MoE-Infinity)")
    esub = e.add_subparsers(dest="eamc_command", required=True)
    b = esub.add_parser("build", help="build an EAM collection from recorded traces")
    b.add_argument("--traces", nargs="+", required=True, help="trace files (.npz or .jsonl)")
    b.add_argument(
        "--out", required=True, help="collection file to write (.npz), e.g. MODEL/moeflow/eamc.npz"
    )
    b.add_argument("--capacity", type=int_at_least(1), default=1000, help="entries kept")
    b.set_defaults(func=cmd_eamc_build)


def load_trace(path: str) -> Any:
    """A ``Trace`` from a .npz trace or a .jsonl routing log."""
    if not Path(path).exists():
        raise MoeflowError(f"trace {path} does not exist")
    if path.endswith(".jsonl"):
        from moeflow.routing.importer import import_jsonl

        return import_jsonl(path)
    from moeflow.routing.trace import Trace

    return Trace.load(path)


def require_matplotlib() -> None:
    """Fail before any work when a plot is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoeflowError("--plot needs matplotlib: pip install 'moeflow[plot]', or drop --plot") from None


def model_geometry(args: argparse.Namespace, trace: Any) -> int | None:
    """Bytes per expert (from --expert-bytes or --model-dir), checking the model's shape against the trace's."""
    if args.expert_bytes is not None:
        return int(args.expert_bytes)
    if args.model_dir is None:
        return None
    import torch

    from moeflow.model.loader import open_model

    lm = open_model(
        args.model_dir, torch.device("cuda"), args.dtype
    )  # built on meta; cuda only picks the dtype
    got = (len(lm.layers), lm.num_experts, lm.top_k)
    want = (trace.num_layers, trace.num_experts, trace.top_k)
    if got != want:
        raise TraceError(
            f"--model-dir {args.model_dir} has {got[0]} MoE layers x {got[1]} experts, top-{got[2]}, but the trace "
            f"has {want[0]} x {want[1]}, top-{want[2]}: give the model the trace was recorded with"
        )
    return int(lm.expert_bytes)


def cmd_simulate(args: argparse.Namespace) -> int:
    from moeflow.experts.policies import make_policy
    from moeflow.routing.eam import EAMCollection
    from moeflow.sim.simulator import simulate
    from moeflow.sim.timing import TimingModel

    if args.plot:
        require_matplotlib()
    trace = load_trace(args.trace)
    total = trace.num_layers * trace.num_experts
    sizes = [c.slots(total, trace.top_k, "--cache-size") for group in args.cache_size for c in group]
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for name in policies:
        make_policy(name)  # unknown names fail before any work
    options = parse_options(args.option)
    if args.eamc:
        options["eamc"] = args.eamc
    elif args.eamc_from:
        options["eamc"] = EAMCollection.from_traces([load_trace(t) for t in args.eamc_from])
    nbytes = model_geometry(args, trace)
    timing = None
    if nbytes is not None:
        timing = TimingModel(nbytes, args.bandwidth * 1e9, args.compute_per_layer_ms * 1e-3)
    runs = [(b, n, name) for b in args.batch_size for n in sizes for name in policies]
    results = []
    bar = tqdm(runs, desc="simulate", unit="run", disable=args.quiet or not sys.stderr.isatty(), leave=False)
    for batch, slots, name in bar:
        bar.set_postfix_str(f"{name} @ {slots} slots, batch {batch}")
        res = simulate(
            trace, name, slots, batch, timing=timing, options=dict(options), model_dir=args.model_dir,
            execution=args.execution, batching=args.batching,
        )  # fmt: skip
        results.append(res.to_dict())
    doc = {
        "command": "moeflow " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "trace": args.trace,
        "model": trace.model,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "eamc": args.eamc or (" ".join(args.eamc_from) if args.eamc_from else None),
        "timing_model": timing.constants() if timing else None,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        from moeflow.sim.plot import plot_hit_ratio

        plot_hit_ratio(results, args.plot, f"{trace.model}: {args.trace}")
    print(json.dumps(doc, indent=1) if args.json else format_table(doc))
    return 0


def format_table(doc: dict) -> str:
    """A plain-text table of a ``cmd_simulate`` document."""
    lines = [f"trace {doc['trace']} ({doc['model']}: {doc['num_layers']} layers x {doc['num_experts']} experts, "
             f"top-{doc['top_k']})"]  # fmt: skip
    tm = doc["timing_model"]
    if tm:
        lines.append(
            f"time model: {tm['formula']}; expert {format_size(tm['expert_bytes'])}, "
            f"{tm['bandwidth_GBps']:g} GB/s, {tm['compute_per_layer_ms']:g} ms compute/layer"
        )
    else:
        lines.append("no bytes per expert given (--expert-bytes or --model-dir): bytes and time not modelled")
    head = f"{'policy':<14}{'batch':>6}{'slots':>7}{'cache%':>7}{'hit':>7}{'misses':>8}{'prefetch':>9}{'wasted':>8}"
    lines.append(head + f"{'moved':>12}{'ms/token':>10}")
    for r in doc["results"]:
        t = r["timing"] or {}
        moved = format_size(r["bytes_moved"]) if r["bytes_moved"] is not None else "-"
        tpt = f"{t['time_per_token_s'] * 1e3:.2f}" if t.get("time_per_token_s") else "-"
        lines.append(
            f"{r['policy']:<14}{r['batch_size']:>6}{r['cache_slots']:>7}{100 * r['cache_fraction']:>6.1f}%"
            f"{r['hit_ratio']:>7.3f}{r['misses']:>8}{r['prefetches']:>9}{r['prefetch_wasted']:>8}{moved:>12}{tpt:>10}"
        )
    return "\n".join(lines)


def cmd_eamc_build(args: argparse.Namespace) -> int:
    from moeflow.routing.eam import EAMCollection

    traces = [load_trace(t) for t in args.traces]
    shapes = {(t.num_layers, t.num_experts) for t in traces}
    if len(shapes) > 1:
        raise MoeflowError(
            f"the traces come from models of different shapes {sorted(shapes)}: build one per model"
        )
    eamc = EAMCollection.from_traces(traces, args.capacity, progress=sys.stderr.isatty())
    eamc.save(args.out)
    n_req = sum(len(t.requests()) for t in traces)
    print(
        f"EAM collection: {len(eamc)} entries from {n_req} requests ({eamc.members.sum()} admitted) -> {args.out}"
    )
    return 0
