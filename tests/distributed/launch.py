"""Start N local processes with torchrun's environment (the tests' stand-in for torchrun, without its agent)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], world: int = 2, timeout_s: float = 30.0) -> list[subprocess.Popen]:
    """``python -m tests.distributed.worker ARGS`` once per rank (stdout and stderr piped)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   MOEFLOW_DIST_TIMEOUT=str(timeout_s),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed.worker", *args], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def finish(procs: list[subprocess.Popen], timeout_s: float = 120.0) -> list[tuple[int, str, str]]:
    """Wait for every rank: (exit code, stdout, stderr) each; a rank still running after ``timeout_s`` is killed."""
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out
