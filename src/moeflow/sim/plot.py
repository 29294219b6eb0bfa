"""Plots of simulation results: hit ratio against cache size, one line per policy, one panel per batch size."""

from __future__ import annotations

import os
from collections import defaultdict

STYLE = {"lru": "o-", "lfu": "s-", "moe-infinity": "^-", "expertflow": "D-", "belady": "k*--"}


def plot_hit_ratio(results: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG of hit ratio (y) against cache size in % of all experts (x) from ``SimResult.to_dict()``s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in results:
            if r["batch_size"] == batch:
                lines[r.get("label") or r["policy"]].append((100 * r["cache_fraction"], r["hit_ratio"]))
        for name, pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, STYLE.get(name, ".-"), label=name)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("device cache (% of all experts)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("hit ratio (requests served from the cache)")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
