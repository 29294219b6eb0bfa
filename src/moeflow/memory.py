"""Memory planning: how many device expert slots and host pool rows the budgets allow, with clear errors."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.config import EngineConfig, format_size
from moeflow.errors import BudgetError, BudgetWarning
from moeflow.model.loader import LoadedModel

MIN_KV_RESERVE = 256 * 2**20
"""The least device memory a GPU budget keeps beside the weights: KV caches and activations, among them the eager
experts' gather scratch (at most ``compute.GATHER_BYTES`` per layer)."""


CUDA_RUNTIME_BYTES = 96 * 2**20
"""Device memory a GPU run holds beyond weights, KV and activations, counted inside the reserve: the cuBLAS
workspaces (32 MiB each on Hopper, one per stream that runs matmuls: compute and graph capture) and what the
captured graphs keep. Measured on the H200 from a process with no workspace yet, tiny Mixtral, float32: 32.4 MiB
over the weights decoding eagerly, 92.3 MiB with graphs (``tests/test_engine_gpu.py``)."""


def default_kv_reserve(budget: int, cuda: bool) -> int:
    """The KV and activation reserve of a device budget when none is given: 5%, at least ``MIN_KV_RESERVE`` (on a
    CPU nothing: activations are ordinary RAM)."""
    return max(budget // 20, MIN_KV_RESERVE) if cuda else 0


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); falls back to total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_ram()


def total_ram() -> int:
    """Physical memory of the machine, or the cgroup limit of this container when that is smaller (bytes)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def warn_if_beyond_machine(cfg: EngineConfig, cuda: bool, device: torch.device) -> None:
    """A BudgetWarning when a budget is larger than the memory the machine has (the run may be killed)."""
    ram = total_ram()
    asked = {"device_memory": cfg.device_memory, "host_memory": cfg.host_memory}
    if cuda and cfg.device_memory is not None:
        gpu = torch.cuda.mem_get_info(device)[1]
        if cfg.device_memory > gpu:
            warnings.warn(
                f"device_memory {format_size(cfg.device_memory)} is more than the GPU's {format_size(gpu)}",
                BudgetWarning,
                stacklevel=3,
            )
        asked.pop("device_memory")
    on_ram = {k: v for k, v in asked.items() if v is not None}
    if on_ram and sum(on_ram.values()) > ram:
        named = " + ".join(f"{k} {format_size(v)}" for k, v in on_ram.items())
        warnings.warn(
            f"{named} is more than this machine's {format_size(ram)} of RAM: expect swapping or the process "
            "to be killed; lower the budget",
            BudgetWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class MemoryPlan:
    num_slots: int
    host_capacity: int
    """Experts the host pool holds (all of them: preloaded)."""
    dense_bytes: int
    expert_bytes: int
    kv_reserve: int
    total_experts: int
    runtime_bytes: int = 0
    """Of ``kv_reserve``: what the GPU runtime holds (``CUDA_RUNTIME_BYTES``); the rest is the KV cache's and the
    activations'."""

    @property
    def kv_budget(self) -> int:
        """Bytes of the reserve the KV caches and activations may take."""
        return self.kv_reserve - self.runtime_bytes

    def describe(self) -> str:
        return (
            f"dense {format_size(self.dense_bytes)}, {self.num_slots}/{self.total_experts} expert slots of "
            f"{format_size(self.expert_bytes)} on the device, host pool {self.host_capacity} experts, "
            f"KV reserve {format_size(self.kv_reserve)}"
        )


def plan_memory(loaded: LoadedModel, cfg: EngineConfig) -> MemoryPlan:
    total = len(loaded.layers) * loaded.num_experts
    per = loaded.expert_bytes
    dense = loaded.dense_bytes
    cuda = loaded.device.type == "cuda"
    warn_if_beyond_machine(cfg, cuda, loaded.device)
    if cfg.num_slots is not None:
        slots, reserve = cfg.num_slots, cfg.kv_reserve or 0
        if slots < loaded.top_k:
            raise BudgetError(
                f"{slots} expert slot{'s' if slots != 1 else ''} cannot hold one token's {loaded.top_k} routed "
                f"experts: give at least {loaded.top_k} slots"
            )
    else:
        budget = cfg.device_memory
        if budget is None:
            budget = torch.cuda.mem_get_info(loaded.device)[0] * 9 // 10 if cuda else dense + total * per
        reserve = cfg.kv_reserve if cfg.kv_reserve is not None else default_kv_reserve(budget, cuda)
        if cuda and reserve < CUDA_RUNTIME_BYTES:
            raise BudgetError(
                f"kv_reserve {format_size(reserve)} cannot hold what the GPU runtime keeps beside the KV cache "
                f"({format_size(CUDA_RUNTIME_BYTES)}: cuBLAS workspaces, captured graphs): pass a kv_reserve of at "
                f"least {format_size(CUDA_RUNTIME_BYTES)} plus the KV cache, or leave it at its default (5% of "
                f"device_memory, at least {format_size(MIN_KV_RESERVE)})"
            )
        slots = min(total, (budget - dense - reserve) // per) if budget > dense + reserve else 0
    need = dense + reserve + loaded.top_k * per
    if slots < loaded.top_k:
        fix = (
            f"raise --device-memory to at least {format_size(need)}"
            if cfg.device_memory is not None
            else "free device memory or pass a larger device_memory (--device-memory)"
        )
        raise BudgetError(
            f"device budget too small: dense weights {format_size(dense)} + KV reserve {format_size(reserve)} + "
            f"one token's {loaded.top_k} routed experts ({format_size(loaded.top_k * per)}) need "
            f"{format_size(need)}; {fix}"
        )
    slots = min(slots, total)
    host = cfg.host_memory
    if host is None and not cuda:
        # on a CPU the slots are in RAM already: misses read the (page-cached) checkpoint directly, unless a read
        # would quantise the expert again (then every expert is quantised once, into the host pool)
        host = total * per if loaded.quantises_on_read else 0
    elif host is None:
        avail = available_ram()
        host = total * per if total * per <= avail * 7 // 10 else avail // 2
    runtime = CUDA_RUNTIME_BYTES if cuda and cfg.num_slots is None else 0
    return MemoryPlan(int(slots), int(min(total, host // per)), dense, per, int(reserve), total, runtime)
