"""Compare routing statistics of traces against issue 3's realism targets, and cut small traces for the repository.

For each ``NAME=TRACE.npz`` it runs ``moeflow.routing.stats.trace_stats`` and reports, as multiples of random
routing (1/E), the four statistics the issue sets targets for:

==========================  ==========================================  ================
statistic                   how it is read here                         target
==========================  ==========================================  ================
usage entropy / log2(E)     minimum over layers                         >= 0.9
most-used expert share      maximum over layers, x uniform (1/E)        <= 3x
consecutive first choice    mean over layers (min..max), x random       1.3x .. 4x
next-layer first choice     mean over layers (max), x random            <= 5x
==========================  ==========================================  ================

Writes the full statistics and the verdicts to ``--json`` and prints a Markdown table.
``--cut SRC.npz:DST.npz:N`` saves the first N requests of a trace (for committing small traces).

Usage: ``python training/realism.py demo-code=.data/traces/demo-heldout-code.npz ... --json OUT.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.routing.stats import trace_stats
from moeflow.routing.trace import Trace


def token_predictability(trace: Trace) -> np.ndarray | None:
    """[L] held-out accuracy of guessing each layer's first choice from the input token id alone: a table (most
    frequent first choice per token) learned on half of the requests, scored on the other half, both ways, pooled;
    tokens unseen in the learning half are guessed as the layer's most frequent first choice. None without tokens."""
    if (trace.token < 0).any() or len(trace.requests()) < 2:
        return None
    reqs = np.asarray(trace.requests())
    half = np.isin(trace.request, reqs[: len(reqs) // 2])
    first = trace.experts[:, :, 0].astype(np.int64)  # [N, L]
    vocab = int(trace.token.max()) + 1
    correct, total = np.zeros(trace.num_layers), 0
    for learn, score in ((half, ~half), (~half, half)):
        for layer in range(trace.num_layers):
            counts = np.zeros((vocab, trace.num_experts), np.int64)
            np.add.at(counts, (trace.token[learn], first[learn, layer]), 1)
            table = np.where(counts.sum(1) > 0, counts.argmax(1), counts.sum(0).argmax())  # [V]
            correct[layer] += (table[trace.token[score]] == first[score, layer]).sum()
        total += int(score.sum())
    return correct / total


def verdicts(stats: dict[str, Any]) -> dict[str, Any]:
    """The four targeted statistics as multiples of random, with pass/miss against the issue's targets."""
    o, e = stats["overall"], stats["num_experts"]
    first, nxt = o["first_repeat"], o["next_layer_first"]
    rows = {
        "entropy_min": (o["entropy_ratio"]["min"], lambda v: v >= 0.9),
        "top_share_max_x": (o["top_share"]["max"] * e, lambda v: v <= 3.0),
        "first_repeat_mean_x": (
            first["mean"] * e if first["mean"] is not None else None,
            lambda v: 1.3 <= v <= 4.0,
        ),
        "first_repeat_range_x": (
            (first["min"] * e, first["max"] * e) if first["min"] is not None else None,
            None,
        ),
        "next_layer_mean_x": (nxt["mean"] * e if nxt["mean"] is not None else None, lambda v: v <= 5.0),
        "next_layer_max_x": (nxt["max"] * e if nxt["max"] is not None else None, None),
    }
    out: dict[str, Any] = {}
    for key, (value, ok) in rows.items():
        out[key] = value
        if ok is not None:
            out[key + "_ok"] = None if value is None else bool(ok(value))
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return f"{v[0]:.2f}..{v[1]:.2f}"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per trace, one column per targeted statistic (miss marked with '✗')."""
    cols = [
        ("entropy_min", "entropy min (≥0.9)"),
        ("top_share_max_x", "top-use max ×unif (≤3)"),
        ("first_repeat_mean_x", "rep-1st mean ×rand (1.3–4)"),
        ("first_repeat_range_x", "rep-1st range ×rand"),
        ("next_layer_mean_x", "next-layer mean ×rand (≤5)"),
        ("next_layer_max_x", "next-layer max ×rand"),
        ("token_first_mean_x", "token-id→1st mean ×rand"),
    ]
    lines = [
        "| trace | tokens | L×E, top-k | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for name, r in results.items():
        s, v = r["stats"], r["verdicts"]
        cells = [fmt(v.get(k)) + (" ✗" if v.get(k + "_ok") is False else "") for k, _ in cols]
        lines.append(
            f"| {name} | {s['num_tokens']} | {s['num_layers']}×{s['num_experts']}, {s['top_k']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", help="NAME=PATH.npz")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cut", action="append", default=[], help="SRC.npz:DST.npz:N (first N requests)")
    args = ap.parse_args()
    for spec in args.cut:
        src, dst, n = spec.split(":")
        trace = Trace.load(src)
        trace.of_requests(trace.requests()[: int(n)]).save(dst)
        print(f"cut {src} -> {dst} ({n} requests, {Path(dst).stat().st_size / 1e6:.2f} MB)")
    results = {}
    for spec in args.traces:
        name, path = spec.split("=", 1)
        trace = Trace.load(path)
        stats = trace_stats(trace)
        tok = token_predictability(trace)
        extra = (
            {}
            if tok is None
            else {
                "token_first_mean_x": float(tok.mean()) * trace.num_experts,
                "token_first": [round(float(x), 4) for x in tok],
            }
        )
        results[name] = {"path": path, "stats": stats, "verdicts": verdicts(stats) | extra}
    if results:
        print(table(results))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"command": "python training/realism.py " + " ".join(args.traces), "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
