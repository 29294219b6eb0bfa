"""Bar chart of the peers result file: decode tokens per second of every system, one panel per geometry and batch
size, bars grouped by the GPU budget: dense + this share of the experts (1.0: everything on the GPU). Rows group by
``budget_fraction`` where they have one (moeflow's: the engine fits KV and activations inside the budget, so its
``cache_fraction``, the share of experts in slots, is smaller), else by ``cache_fraction``.

    python3 benchmarks/peers/plot.py benchmarks/results/peers-h200.json --out benchmarks/results/peers-h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch


def label(row: dict) -> str:
    """The bar's system name; moeflow on the checkpoint's own routing is told apart from replayed routing."""
    return row["system"] + (" (own routing)" if row.get("routing") == "own" else "")


def group(row: dict) -> float:
    """The budget a row ran under, as a share of the experts."""
    return round(row.get("budget_fraction", row["cache_fraction"]), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    data = json.loads(args.result.read_text())
    runs = data["runs"]
    panels = sorted({(r["geometry"], r["batch"]) for r in runs})
    systems = sorted({label(r) for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    colours = plt.get_cmap("tab20")(range(len(systems)))
    for ax, (geometry, batch) in zip(axes[0], panels):
        rows = [r for r in runs if r["geometry"] == geometry and r["batch"] == batch]
        groups = sorted({group(r) for r in rows})
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            xs, ys = [], []
            for g, frac in enumerate(groups):
                hit = [r for r in rows if label(r) == system and group(r) == frac]
                if hit:
                    xs.append(g + (i - (len(systems) - 1) / 2) * width)
                    ys.append(hit[0]["tokens_per_s"])
            if xs:
                ax.bar(xs, ys, width, label=system, color=colours[i])
        ax.set_xticks(range(len(groups)), [f"{f:g}" for f in groups])
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xlabel("GPU budget: dense + this share of the experts")
        ax.set_ylabel("decode tokens / s (all sequences)")
        ax.set_yscale("log")
        ax.set_title(f"{geometry}, batch {batch} ({data.get('device', '?')})")
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colours[i], label=system) for i, system in enumerate(systems)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
