"""The peers result file: one JSON (``device``, ``commit``, ``versions``, ``runs``, ``skipped``) that every peer
runner appends to as it goes, so a run stopped at its time limit still leaves what it measured; plus a GPU memory
sampler for peers that run in another process (nvidia-smi), and ``merge`` for the files two device calls return.

    python3 benchmarks/peers/record.py merge A.json B.json --out benchmarks/results/peers-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

RUN_KEYS = (
    "system", "geometry", "gpu_budget", "cache_fraction", "batch", "prompt_tokens", "ttft_ms", "ms_per_token",
    "tokens_per_s", "peak_gpu_bytes", "notes",
)  # fmt: skip


def _commit() -> str:
    env = os.environ.get("MOEFLOW_COMMIT")  # the device copy's git metadata can be stale
    if env:
        return env
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _device() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"


def load(path: Path) -> dict[str, Any]:
    """The result file at ``path``, or a new one naming this machine and commit."""
    if path.exists():
        return json.loads(path.read_text())
    return {
        "device": _device(), "commit": _commit(), "python": platform.python_version(), "versions": {},
        "runs": [], "skipped": [], "llama_bench": [],
    }  # fmt: skip


def save(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def add_run(path: Path, **row: Any) -> dict[str, Any]:
    """Append one ``runs`` row (every key of RUN_KEYS, extra keys allowed) and save at once."""
    missing = [k for k in RUN_KEYS if k not in row]
    if missing:
        raise ValueError(f"run row lacks {missing}")
    result = load(path)
    result["runs"].append(row)
    save(path, result)
    print(json.dumps(row), flush=True)
    return row


def add_skip(path: Path, system: str, reason: str) -> None:
    """Record that ``system`` (or one of its configurations) did not run, and why."""
    result = load(path)
    entry = {"system": system, "reason": reason}
    if entry not in result["skipped"]:
        result["skipped"].append(entry)
        save(path, result)
    print(f"skipped {system}: {reason}", flush=True)


def set_version(path: Path, name: str, value: Any) -> None:
    result = load(path)
    result["versions"][name] = value
    save(path, result)


class GpuMemorySampler:
    """Peak of nvidia-smi's used memory on GPU 0 while the ``with`` block runs, minus its value at entry (so the
    figure is what the process inside used, when nothing else runs on the GPU); 0 without nvidia-smi."""

    def __init__(self, period_s: float = 0.5):  # sparse: nvidia-smi costs CPU that --n-cpu-moe runs use
        self.period_s, self.base, self.peak = period_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def used() -> int:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, timeout=5,
            )  # fmt: skip
            return int(out.stdout.split()[0]) << 20
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.period_s)

    def __enter__(self) -> GpuMemorySampler:
        self.base = self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta(self) -> int:
        return max(self.peak - self.base, 0)


def merge(paths: list[Path], out: Path) -> None:
    """One result file from several (two device calls): runs, skips and llama-bench rows concatenated, versions
    united; a run row present in two files (same system, budget, batch and notes) is kept once."""
    result: dict[str, Any] = {}
    seen: set[str] = set()
    for p in paths:
        part = json.loads(p.read_text())
        if not result:
            result = {**part, "runs": [], "skipped": [], "llama_bench": [], "versions": {}}
        result["versions"].update(part.get("versions", {}))
        for row in part.get("runs", []):
            key = json.dumps([row[k] for k in ("system", "cache_fraction", "batch", "notes")])
            if key not in seen:
                seen.add(key)
                result["runs"].append(row)
        result["skipped"] += part.get("skipped", [])
        result["llama_bench"] += part.get("llama_bench", [])
    save(out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description="merge peers result files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    merge(args.files, args.out)


if __name__ == "__main__":
    main()
