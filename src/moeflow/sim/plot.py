"""Plots of simulation results: hit ratio against cache size, one line per policy, one panel per batch size, and
below it the experts copied to the device per decode token (the cost a prefetching policy pays for its hits)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable

STYLE = {"lru": "o-", "lfu": "s-", "moe-infinity": "^-", "expertflow": "D-", "belady": "k*--"}


def _series(results: list[dict], batch: int, value: Callable[[dict], float]) -> dict[str, tuple]:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        if r["batch_size"] == batch:
            lines[r.get("label") or r["policy"]].append((100 * r["cache_fraction"], value(r)))
    return {name: tuple(zip(*sorted(pts))) for name, pts in sorted(lines.items())}


def plot_hit_ratio(results: list[dict], path: str | os.PathLike, title: str = "", loads: bool = True) -> None:
    """Write a PNG from ``SimResult.to_dict()``s (or pooled rows with the same keys): hit ratio (top) and, when
    ``loads``, experts copied per decode token (bottom) against cache size in % of all experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in results})
    rows = 2 if loads else 1
    fig, axes = plt.subplots(rows, len(batches), figsize=(5.5 * len(batches), 4.2 * rows), squeeze=False)
    for col, batch in enumerate(batches):
        panels = [("hit ratio (requests served from the cache)", lambda r: r["hit_ratio"])]
        if loads:
            panels.append(
                ("experts copied per decode token", lambda r: r["loads"] / max(1, r["decode_tokens"]))
            )
        for row, (ylabel, value) in enumerate(panels):
            ax = axes[row][col]
            for name, (xs, ys) in _series(results, batch, value).items():
                ax.plot(xs, ys, STYLE.get(name, ".-"), label=name)
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("device cache (% of all experts)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
