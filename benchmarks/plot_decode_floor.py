"""Plot decode-floor JSON: ms/token against cache fraction, one line per policy and batch, both floors drawn in.

python benchmarks/plot_decode_floor.py benchmarks/results/decode-floor-h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    path = Path(sys.argv[1])
    runs = json.loads(path.read_text())["runs"]
    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in runs if r["batch"] == batch]
        for policy in sorted({r["policy"] for r in rows}):
            mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["cache_fraction"])
            x = [r["cache_fraction"] for r in mine]
            line = ax.plot(x, [r["ms_per_token"] for r in mine], marker="o", label=f"{policy}")[0]
            ax.plot(
                x,
                [r["own_floor_ms"] for r in mine],
                ls=":",
                color=line.get_color(),
                label=f"{policy} own floor",
            )
        bel = sorted({(r["cache_fraction"], r["belady_floor_ms"]) for r in rows})
        ax.plot([b[0] for b in bel], [b[1] for b in bel], "k--", label="Belady floor")
        ax.set(title=f"batch {batch}", xlabel="cache fraction", ylabel="ms / token", ylim=(0, None))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
