"""Plots of a routing trace for people: expert-use heat-map per layer and the ``trace_stats`` curves (PNG).

matplotlib (Agg backend, no display needed) is an optional dependency: ``pip install moeflow[plot]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.routing.stats import usage_counts
from moeflow.routing.trace import Trace

_LABELS = {
    "first_repeat": "consecutive: same first choice",
    "any_repeat": "consecutive: any expert shared",
    "next_layer_first": "next layer's first choice guessed",
    "top_share": "share of most-used expert",
    "entropy_ratio": "usage entropy / log2(E)",
}


def _pyplot():  # -> matplotlib.pyplot module
    try:
        import matplotlib
    except ImportError:
        raise MoeflowError("plotting needs matplotlib: pip install 'moeflow[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column(stats: dict[str, Any], name: str) -> np.ndarray:
    """[L] values of one statistic per layer (NaN where undefined)."""
    return np.array([np.nan if layer[name] is None else layer[name] for layer in stats["layers"]], float)


def _heatmap(ax, fig, trace: Trace) -> None:
    counts = usage_counts(trace)  # [L, E]
    rel = counts / counts.sum(-1, keepdims=True) * trace.num_experts  # 1.0 = uniform use
    im = ax.imshow(rel.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert")
    ax.set_title("expert use (1 = uniform)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _curves(ax, stats: dict[str, Any], names: tuple[str, ...]) -> None:
    x = np.arange(stats["num_layers"])
    for name in names:
        (line,) = ax.plot(x, _column(stats, name), marker=".", label=_LABELS.get(name, name))
        ax.axhline(stats["overall"][name]["random"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="best")


def plot_trace(trace: Trace, stats: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write a PNG with the heat-map and the statistics curves (dashed lines: random routing)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    try:
        _heatmap(axes[0], fig, trace)
        _curves(
            axes[1], stats, ("entropy_ratio", "top_share", "first_repeat", "any_repeat", "next_layer_first")
        )
        axes[1].set_title("routing statistics (dashed: random routing)")
        lru = tuple(f"lru_hit_{c}" for c in stats["cache_sizes"])
        _curves(axes[2], stats, lru)
        for text in axes[2].get_legend().get_texts():
            text.set_text(text.get_text().replace("lru_hit_", "LRU hit, cache of ") + " experts")
        axes[2].set_title("per-layer LRU hit ratio (dashed: random routing)")
        fig.suptitle(
            f"{stats['model']}: {stats['num_tokens']} tokens, {stats['num_requests']} requests, "
            f"{stats['num_layers']} layers, {stats['num_experts']} experts, top-{stats['top_k']}"
        )
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
