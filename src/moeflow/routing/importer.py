"""Importing routing logs recorded elsewhere into the moeflow trace format.

The JSON-lines shape (one object per line, one line per (request, token, layer)):
``{"problem_id": int, "token_idx": int, "layer": int, "experts": [K ints, first choice first],
"gating_probs": [K floats]}`` (other keys are ignored). Tokens that lack some layers are skipped. Token ids are
unknown (``token`` = -1); every row is a decode token; each (request, token_idx) is its own engine step,
numbered in order of first appearance in the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.errors import TraceError
from moeflow.routing.trace import Trace

_FIELDS = ("problem_id", "token_idx", "layer", "experts", "gating_probs")


@dataclass
class ImportReport:
    """What ``import_jsonl`` kept and dropped."""

    rows: int
    tokens_kept: int
    tokens_skipped: int


def _parse_line(path: Path, lineno: int, line: str) -> tuple[int, int, int, list[int], list[float]]:
    try:
        obj = json.loads(line)
        req, tok, layer = int(obj["problem_id"]), int(obj["token_idx"]), int(obj["layer"])
        experts = [int(e) for e in obj["experts"]]
        probs = [float(p) for p in obj["gating_probs"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise TraceError(
            f"{path}:{lineno}: expected a JSON object with fields {', '.join(_FIELDS)} "
            "(experts and gating_probs as lists of equal length)"
        ) from None
    if len(experts) != len(probs) or not experts:
        raise TraceError(
            f"{path}:{lineno}: 'experts' and 'gating_probs' must be non-empty lists of equal length"
        )
    if layer < 0 or min(experts) < 0:
        raise TraceError(f"{path}:{lineno}: layer and expert ids must be non-negative")
    return req, tok, layer, experts, probs


def read_jsonl_rows(
    path: str | os.PathLike,
) -> dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]]:
    """{(request, token_idx): {layer: (experts, probs)}} in order of first appearance in the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"routing log {path} does not exist")
    tokens: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = {}
    top_k: int | None = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            req, tok, layer, experts, probs = _parse_line(path, lineno, line)
            if top_k is None:
                top_k = len(experts)
            elif len(experts) != top_k:
                raise TraceError(f"{path}:{lineno}: {len(experts)} experts, earlier lines had {top_k}")
            layers = tokens.setdefault((req, tok), {})
            if layer in layers:
                raise TraceError(f"{path}:{lineno}: request {req} token {tok} layer {layer} appears twice")
            layers[layer] = (experts, probs)
    if not tokens:
        raise TraceError(f"routing log {path} holds no rows")
    return tokens


def import_jsonl_with_report(
    path: str | os.PathLike, model: str | None = None, num_experts: int | None = None
) -> tuple[Trace, ImportReport]:
    """Like ``import_jsonl`` but also says how many tokens were skipped for missing layers."""
    tokens = read_jsonl_rows(path)
    num_layers = 1 + max(max(layers) for layers in tokens.values())
    complete = [(key, layers) for key, layers in tokens.items() if len(layers) == num_layers]
    if not complete:
        raise TraceError(f"{path}: no token has all {num_layers} layers")
    top_k = len(next(iter(complete[0][1].values()))[0])
    n = len(complete)
    experts = np.empty((n, num_layers, top_k), np.int64)  # [N, L, K]
    weights = np.empty((n, num_layers, top_k), np.float32)  # [N, L, K]
    for i, (_, layers) in enumerate(complete):
        for layer, (ex, pr) in layers.items():
            experts[i, layer] = ex
            weights[i, layer] = pr
    seen_e = int(experts.max()) + 1
    if num_experts is None:
        num_experts = seen_e
    elif num_experts < seen_e:
        raise TraceError(f"{path}: expert id {seen_e - 1} appears but --num-experts is {num_experts}")
    keys = np.asarray([key for key, _ in complete], np.int64).reshape(n, 2)
    trace = Trace(
        model=model if model is not None else Path(path).stem,
        num_experts=num_experts,
        top_k=top_k,
        request=keys[:, 0],
        position=keys[:, 1],
        decode=np.ones(n, bool),
        step=np.arange(n, dtype=np.int64),
        token=np.full(n, -1, np.int64),
        experts=experts,
        weights=weights,
        moe_layer_ids=np.arange(num_layers, dtype=np.int64),
    )
    rows = sum(len(layers) for layers in tokens.values())
    return trace, ImportReport(rows=rows, tokens_kept=n, tokens_skipped=len(tokens) - n)


def import_jsonl(path: str | os.PathLike, model: str | None = None, num_experts: int | None = None) -> Trace:
    """A ``Trace`` from a JSON-lines routing log (see the module docstring). ``model`` defaults to the file's
    stem; ``num_experts`` to the largest expert id seen plus one (pass the model's real count when the log
    may not use every expert)."""
    return import_jsonl_with_report(path, model, num_experts)[0]
