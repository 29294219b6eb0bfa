"""Expert-aware token scheduling, measured on recorded routing: distinct experts per layer per decode step of
each batch, with first-come-first-served batches and with ``ExpertAwareScheduler`` batches, at batch 4/8/16/32.

A request's routing does not depend on which requests share its batch (the engine's outputs are batch-invariant),
so the recorded per-request decode routing tells exactly which experts any grouping touches. Paths given to the
scheduler (what it may know before the request runs):

* ``oracle``: the request's own recorded decode routing (an upper bound: it uses the future);
* ``prefill``: the recorded routing of the request's prompt tokens (known once its prefill has run);
* ``predicted``: the predictor's mean over the prompt tokens (known before anything runs; needs --predictor).

Requests of several traces are interleaved in arrival order (trace 1 request 1, trace 2 request 1, ...), so
FIFO batches mix domains as a server queue would. Writes ``benchmarks/results/sched-NAME.json``.

    python benchmarks/sched_eval.py --traces heldout-code.npz heldout-prose.npz --predictor P.pt --name demo
    python benchmarks/sched_eval.py --synthetic --name synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import zip_longest
from pathlib import Path

import numpy as np

from moeflow.routing.sequences import RequestSeq, request_sequences
from moeflow.routing.trace import Trace
from moeflow.scheduler import ExpertAwareScheduler, decode_distinct, fifo, usage_path

RESULTS = Path(__file__).parent / "results"
SPECIALIZATION = 0.5
"""Synthetic traces: per-domain router bias (0.5 keeps usage entropy >= 0.9 of uniform per domain)."""


def interleave(traces: list[Trace]) -> list[RequestSeq]:
    per = [request_sequences(t) for t in traces]
    return [s for group in zip_longest(*per) for s in group if s is not None]


def paths_of(seqs: list[RequestSeq], num_experts: int, predictor) -> dict[str, list[np.ndarray]]:
    out = {
        "oracle": [usage_path(s.experts[s.decode], num_experts) for s in seqs],
        "prefill": [usage_path(s.experts[~s.decode], num_experts) for s in seqs],
    }
    if predictor is not None:
        out["predicted"] = [predictor.request_path(s.tokens[~s.decode]) for s in seqs]
    return out


def measure(batches: list[list[int]], seqs: list[RequestSeq], num_experts: int) -> dict:
    """Mean distinct experts per layer per decode step, and per decode token, over all batches."""
    total, steps, tokens = 0.0, 0, 0
    for b in batches:
        routes = [seqs[i].experts[seqs[i].decode & seqs[i].valid] for i in b]
        t, s = decode_distinct(routes, num_experts)
        total, steps, tokens = total + t, steps + s, tokens + sum(len(r) for r in routes)
    per_step = total / max(steps, 1)  # [L]
    return {
        "distinct_per_layer_per_step": float(per_step.mean()),
        "distinct_per_layer_per_token": float(total.sum() / max(tokens, 1) / len(per_step)),
        "per_layer": [round(float(x), 3) for x in per_step],
        "decode_steps": steps,
    }


def synthetic(num_requests: int) -> tuple[list[Trace], object]:
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_routing import SyntheticRouter

    from moeflow.routing.predictor import RoutingPredictor
    from moeflow.routing.predictor_train import TrainConfig, train_predictor

    router = SyntheticRouter(num_layers=16, num_experts=64, top_k=8, specialization=SPECIALIZATION)
    traces = [
        router.trace(d, num_requests // 2, 48, 64, seed=21 + i) for i, d in enumerate(("code", "prose"))
    ]
    train = [router.trace(d, 96, 48, 64, seed=1 + i) for i, d in enumerate(("code", "prose"))]
    net, vocab, _ = train_predictor(train, TrainConfig(max_epochs=15), progress=False)
    pred = RoutingPredictor(net.cfg, vocab, {k: v.detach().numpy() for k, v in net.state_dict().items()})
    return traces, pred


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="*", default=[], help="trace files; their requests are interleaved")
    ap.add_argument("--predictor", default=None, help="predictor file for the 'predicted' paths")
    ap.add_argument(
        "--synthetic", action="store_true", help="synthetic traces and a predictor trained on them"
    )
    ap.add_argument("--requests", type=int, default=128, help="synthetic requests")
    ap.add_argument("--batches", default="4,8,16,32", help="batch sizes")
    ap.add_argument("--max-wait", type=int, default=2, help="fairness bound W (rounds later than FIFO)")
    ap.add_argument("--name", default="demo", help="results go to benchmarks/results/sched-NAME.json")
    args = ap.parse_args()
    if args.synthetic:
        traces, predictor = synthetic(args.requests)
    else:
        if not args.traces:
            ap.error("give --traces (or --synthetic)")
        traces = [Trace.load(p) for p in args.traces]
        predictor = None
        if args.predictor:
            from moeflow.routing.predictor import load_predictor

            predictor = load_predictor(args.predictor)
    ne = traces[0].num_experts
    seqs = [s for s in interleave(traces) if (s.decode & s.valid).any()]
    paths = paths_of(seqs, ne, predictor)
    out: dict = {"command": "python " + " ".join(sys.argv), "requests": len(seqs), "max_wait": args.max_wait}
    out["traces"] = [t.model for t in traces]
    out["results"] = {}
    for b in (int(x) for x in args.batches.split(",")):
        row = {"fifo": measure(fifo(len(seqs), b), seqs, ne)}
        for kind, p in paths.items():
            row[kind] = measure(ExpertAwareScheduler(b, args.max_wait).order(p), seqs, ne)
            base = row["fifo"]["distinct_per_layer_per_step"]
            row[kind]["reduction_vs_fifo"] = round(1 - row[kind]["distinct_per_layer_per_step"] / base, 4)
        out["results"][f"batch{b}"] = row
        print(f"batch {b:>2}: fifo {row['fifo']['distinct_per_layer_per_step']:.2f} distinct/layer/step; "
              + "; ".join(f"{k} {v['distinct_per_layer_per_step']:.2f} ({v['reduction_vs_fifo']:+.1%})"
                          for k, v in row.items() if k != "fifo"))  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"sched-{args.name}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
