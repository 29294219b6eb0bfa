"""The peers result file: one JSON (``device``, ``commit``, ``versions``, ``runs``, ``skipped``) that every peer
runner appends to as it goes, so a run stopped at its time limit still leaves what it measured; plus a GPU memory
sampler for peers that run in another process (nvidia-smi), ``merge`` for the files two device calls return, and
``replace`` for re-running some systems only: their rows come from the new run, each keeping its provenance.

    python3 benchmarks/peers/record.py merge A.json B.json --out benchmarks/results/peers-h200.json
    python3 benchmarks/peers/record.py replace benchmarks/results/peers-h200.json moeflow.json --systems moeflow- \
        --out benchmarks/results/peers-h200.json
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


def replace(old_path: Path, new_path: Path, prefixes: list[str], out: Path, note: str | None = None) -> None:
    """``old_path``'s result file with every run and skip whose system starts with one of ``prefixes`` taken from
    ``new_path`` instead (its runs where the first replaced one stood); ``llama_bench`` and ``versions`` stay the old
    file's. A taken row gets a ``commit`` field (the new run's) where that differs from the file's; ``provenance``
    says which rows came from which commit and run (a replacement that the new prefixes cover wholly is dropped)."""
    old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
    base, commit, keys = old.get("commit", "unknown"), new.get("commit", "unknown"), tuple(prefixes)
    taken = [dict(r) for r in new["runs"] if r["system"].startswith(keys)]
    if commit != base:
        for row in taken:
            row.setdefault("commit", commit)  # a row the new file took from elsewhere keeps its own
    kept = [r for r in old["runs"] if not r["system"].startswith(keys)]
    first = next((i for i, r in enumerate(old["runs"]) if r["system"].startswith(keys)), len(old["runs"]))
    at = sum(1 for r in old["runs"][:first] if not r["system"].startswith(keys))
    skips = [s for s in new.get("skipped", []) if s["system"].startswith(keys)]
    prov = old.get("provenance") or [
        {"commit": base, "source": old_path.name, "systems": "every row not named below",
         "device": old.get("device"), "command": old.get("command")}
    ]  # fmt: skip
    covered = [
        p for p in prov[1:] if all(any(q.startswith(k) for k in keys) for q in p["systems"])
    ]  # every row of these replacements is replaced now
    entry = {"commit": commit, "source": new_path.name, "systems": list(prefixes), "runs": len(taken),
             "skipped": len(skips), "device": new.get("device"), "versions": new.get("versions", {}),
             "command": new.get("command"), "note": note}  # fmt: skip
    result = {
        **old,
        "runs": kept[:at] + taken + kept[at:],
        "skipped": [s for s in old.get("skipped", []) if not s["system"].startswith(keys)] + skips,
        "provenance": [p for p in prov if p not in covered] + [entry],
    }
    save(out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description="merge peers result files, or replace some systems' rows")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--out", required=True, type=Path)
    r = sub.add_parser("replace", help="rows of the systems named by --systems prefixes come from NEW")
    r.add_argument("old", type=Path)
    r.add_argument("new", type=Path)
    r.add_argument("--systems", nargs="+", required=True, help="system-name prefixes, e.g. moeflow-")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--note", default=None, help="why the rows were re-run (kept in provenance)")
    args = ap.parse_args()
    if args.cmd == "merge":
        merge(args.files, args.out)
    else:
        replace(args.old, args.new, args.systems, args.out, args.note)


if __name__ == "__main__":
    main()
