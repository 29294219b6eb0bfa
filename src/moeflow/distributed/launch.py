"""``--gpus N``: start N local processes of the same command, one per device, each with torchrun's environment.

This is torchrun's single-host case without its agent: rank ``r`` gets ``RANK=r``, ``LOCAL_RANK=r``,
``WORLD_SIZE=N`` and a free port on 127.0.0.1, and computes on ``cuda:r`` (or, with ``--device cpu``, in its own CPU
process). The launcher waits; when a rank fails, the others get the collective timeout to notice and exit on their
own, and are killed after it. Several hosts: use torchrun (``torchrun --nnodes ... -m moeflow ...``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from moeflow.distributed.group import timeout_from_env
from moeflow.errors import ConfigError


def check_devices(count: int, device: str) -> None:
    """``--gpus count`` fits this host: that many GPUs for a CUDA device, any count of CPU processes for the CPU."""
    import torch

    if device == "cpu":
        return
    have = torch.cuda.device_count()
    if have < count:
        raise ConfigError(
            f"--gpus {count} but this host has {have} GPU(s): lower --gpus, or pass --device cpu for {count} CPU "
            "processes (tests)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(count: int, argv: list[str]) -> int:
    """Run ``python -m moeflow ARGV`` as ``count`` ranks and wait: 0 when all succeed, else the first failure's
    exit status."""
    port, timeout = _free_port(), timeout_from_env()
    procs = []
    for rank in range(count):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count),
                   LOCAL_WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "moeflow", *argv], env=env))
    failed: int | None = None
    deadline: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                code = p.poll()
                if code not in (None, 0) and failed is None:
                    failed, deadline = code, time.monotonic() + timeout + 5
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next((c for c in codes if c != 0), 0)
    if failed < 0:  # killed by a signal: report it as the shell does
        failed = 128 - failed
    return failed
