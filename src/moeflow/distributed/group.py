"""The process group of an expert-parallel run: rank, world size, backend, and collectives bounded by a timeout.

One process per device (NCCL between GPUs, gloo between CPU processes). The group is read from the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Every collective runs
under the group's timeout; a failure (a rank that died closes its connections, one that stalls runs into the
timeout) becomes one :class:`~moeflow.errors.DistributedError` line instead of a hang or a traceback. NVLink
multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0`` is set before an NCCL group starts.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moeflow.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 60.0
"""Seconds any collective (and the start of the group) may wait for the other ranks."""

TIMEOUT_ENV = "MOEFLOW_DIST_TIMEOUT"
"""Environment variable overriding ``DEFAULT_TIMEOUT_S`` (seconds)."""


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={text!r} is not a number: start the processes with torchrun") from None


def timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text}")
    return value


@dataclass(frozen=True)
class Group:
    """This process's place in the run; the collectives the engine needs, each bounded by ``timeout_s``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float

    @property
    def leader(self) -> bool:
        """Rank 0: the process that prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives take their tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "max") ``tensor`` over the ranks in place (every rank gets the same bits); returns it."""
        if self.world_size == 1:
            return tensor
        wide = tensor.dtype in (torch.float32, torch.float64, torch.int64)
        work = tensor if wide or self.backend != "gloo" else tensor.float()  # gloo: no bf16/fp16 sums
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        self._run("all_reduce", lambda: dist.all_reduce(work, op=reduce_op))
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._run("broadcast", lambda: dist.broadcast(t, src=0))
        return int(t.item())

    def all_equal(self, value: int) -> bool:
        """Whether every rank holds the same ``value`` (e.g. a hash of its generated tokens)."""
        t = self.all_reduce(torch.tensor([value, -value], dtype=torch.int64, device=self.device), "max")
        return int(t[0]) == value and int(t[1]) == -value

    def _run(self, what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except (RuntimeError, dist.DistError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise DistributedError(
                f"rank {self.rank}: {what} with the other {self.world_size - 1} rank(s) failed within "
                f"{self.timeout_s:g} s (a rank died or stalled; see its own output): {first}"
            ) from None


def init_group(device_type: str, timeout_s: float | None = None) -> Group:
    """Join (or start) the process group described by torchrun's environment; ``device_type`` "cuda" uses NCCL,
    anything else gloo. A single process (no ``WORLD_SIZE``) gets a group of one without torch.distributed."""
    world = world_size_from_env()
    timeout = timeout_from_env() if timeout_s is None else timeout_s
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if world == 1:
        return Group(0, 1, 0, backend, timeout)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with torchrun "
            "(torchrun --nproc-per-node N -m moeflow ...) or use --gpus N"
        )
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (the device documentation asks)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timed-out collective raises, not aborts
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank} wants cuda:{local} but this host has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=world)
        except (RuntimeError, dist.DistError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise DistributedError(
                f"rank {rank}: the {world} processes did not all join within {timeout:g} s: {first}"
            ) from None
        # leave the group before the interpreter tears down: a process group still alive then can abort the
        # process ("terminate called without an active exception", exit -6; seen once in 2-rank gloo tests)
        atexit.register(close_group)
    return Group(rank, world, local, backend, timeout)


def close_group() -> None:
    """Leave the process group (end of run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
