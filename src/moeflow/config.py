"""Engine configuration: budgets, device and policy choices, each field documented; sizes parsed once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from moeflow.errors import ConfigError, MoeflowError
from moeflow.quant.formats import MISS_DTYPES, check_expert_dtype
from moeflow.validate import check_backend, check_device, check_dtype, check_int

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}


def parse_size(value: int | float | str | None) -> int | None:
    """Parse "12GiB", "512MB", "1.5G" or a plain number of bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MoeflowError(
            f"cannot parse memory size {value!r}: write it like '12GiB', '512MB' or a byte count"
        )
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise MoeflowError(f"memory size {value!r} must be a finite number of bytes >= 0")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise MoeflowError(
            f"cannot parse memory size {value!r}: write it like '12GiB', '512MB' or a byte count"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int | float) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass
class EngineConfig:
    """Everything the engine needs besides the checkpoint path."""

    device: str = "auto"
    """Compute device: "cuda", "cuda:N", "cpu", or "auto" (CUDA when available)."""

    device_memory: int | None = None
    """Bytes the engine may use on the compute device: dense weights + KV reserve + expert slots.
    None: all experts get a slot when the device has room, else what free memory allows."""

    host_memory: int | None = None
    """Bytes of host RAM for the host expert pool (pinned when the device is a GPU).
    None: with a GPU, every expert is preloaded when all fit in 70% of available RAM, else 50% of available RAM;
    on a CPU, none (the device slots are in RAM already; misses read the page-cached checkpoint)."""

    kv_reserve: int | None = None
    """Bytes of device_memory kept for the KV cache, activations and what the GPU runtime holds (cuBLAS workspaces,
    captured graphs: ``memory.CUDA_RUNTIME_BYTES``, 96 MiB, the least a GPU budget's reserve may be). None: 5% of
    device_memory, at least 256 MiB (CPU: 0, since activations live in ordinary RAM)."""

    policy: str | Any = "lru"
    """Cache policy name ("lru", "lfu", or any registered name) or a CachePolicy instance."""

    dtype: str = "auto"
    """Compute dtype: "auto", "bfloat16", "float16" or "float32". "auto" keeps the checkpoint's dtype on a CPU (a bf16
    checkpoint stays bf16 in RAM), and on a GPU too, except that a float32 checkpoint computes in bfloat16."""

    num_slots: int | None = None
    """Force the number of device expert slots (overrides the size computed from device_memory)."""

    expert_backend: str = "auto"
    """Expert compute over the slot pool: "auto" (gather + bmm for decode-sized layers, the loop for prefill),
    "loop" (eager, per expert), "batched" (gather + bmm), "grouped" (torch grouped_mm; at most 1024 slots), or
    "triton" (a kernel reading weights from slots by index, CUDA only; slower than gather + bmm so far)."""

    decode: str = "auto"
    """How decode steps run: "graph" (a static KV cache and slot-table experts, each step one replay of a captured
    CUDA graph; misses read from pinned host memory inside the kernel), "static" (the same step run eagerly, on any
    device), "eager" (one host sync per MoE layer; demand loads before each layer), or "auto" ("graph" on a GPU
    whose host pool holds every expert, else "eager")."""

    prefill: str = "auto"
    """How a static decoder's prompts are prefilled: "slots" (the MoE layers through the slot table, as a decode
    step runs them: no host sync inside the prefill; the policy learns its routing afterwards), "eager" (the
    per-layer path: the policy plans and loads before each layer), or "auto" ("slots" on a GPU when the slot pool
    holds every expert and the prompt is short enough for the routing kernel, else "eager")."""

    overlap: bool = True
    """Overlap the host's work between static decode steps with the device's: step N+1 is launched before step N
    is settled, where its inputs and slot table can be known (greedy sampling, a slot pool holding every expert,
    filled once up front when it can hold them all; ``engine/overlap.py``), and launched again when the guess was
    wrong. The same outputs and policy calls as without. On the H200 (OLMoE geometry, all resident, compiled graph)
    it takes a step from 2.42 to 1.72 ms at batch 1 and 0.71 to 0.62 ms/token at batch 8
    (``benchmarks/results/resident-step-overlap-h200.json``); False (``--no-overlap``) settles each step first."""

    overlap_offloaded: bool = True
    """With ``overlap``: also launch offloaded decode steps (a slot table that changes every step) before the last is
    settled, on a policy plan made one step behind (``CachePolicy.plan_in_flight``; the step folds the last one's
    fills into the table on the device). The same outputs; the policy's decisions lag a step. On the H200 at 25%
    cached it was faster in every row measured (bf16 and int4, batch 1 and 8, LRU and ExpertFlow; ExpertFlow at
    batch 1 in bf16 27.9 -> 24.4 ms/token, uncompiled: ``benchmarks/results/decode-floor-lag-s25-h200.json``); False
    (``--no-overlap-offloaded``) settles each offloaded step first."""

    compile: bool | None = None
    """Compile the static decode step with ``torch.compile`` before it is captured: the dense layers' many small
    kernels (norms, rotary, residuals, the experts' gating and combine) are fused. It costs a compilation per batch
    shape (tens of seconds on a GPU). None: on for "graph" decode, off otherwise."""

    schedule: str = "auto"
    """Which prompts share a batch when there are more than the batch size: "fifo" (arrival order), "expert"
    (ExpertFlow's token scheduling: group requests whose predicted routing paths share experts), or "auto"
    ("expert" when a routing predictor is available, else "fifo")."""

    max_wait: int = 2
    """Fairness bound of expert-aware scheduling: no request runs more than this many batches later than FIFO."""

    expert_dtype: str = "auto"
    """Form experts are held in, in the host pool and the slots: "bf16" (full precision: the compute dtype), "fp8",
    "int8", "int4", "int3", "int2" (quantised once at load, dequantised as they are computed with; see
    ``moeflow.quant``), or "auto" (as the checkpoint stores them: full precision, or a quantised checkpoint's own
    format, e.g. gpt-oss's MXFP4). Attention and dense weights stay in the compute dtype."""

    miss_dtype: str = "none"
    """Low-precision copy a miss computes with ("fp8", "int8", "int4", "int3", "int2"; "none": misses compute at
    full precision). Hits compute with the full-precision expert in their slot; needs full-precision slots
    (``expert_dtype`` "bf16", or "auto" on a full-precision checkpoint). Every expert's copy is kept in host RAM."""

    progress: bool = True
    """Show progress bars while loading."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Options for plug-ins (policies, prefetchers) that the core does not interpret."""

    def __post_init__(self) -> None:
        self.device_memory = parse_size(self.device_memory)
        self.host_memory = parse_size(self.host_memory)
        self.kv_reserve = parse_size(self.kv_reserve)
        self._validate()

    def _validate(self) -> None:
        """Range and name checks of every field (sizes are parsed before): one-line ConfigErrors."""
        check_device(self.device)
        check_dtype(self.dtype)
        check_backend(self.expert_backend, self.device)
        if self.decode not in ("auto", "graph", "static", "eager"):
            raise ConfigError(f"unknown decode mode {self.decode!r}: use auto, graph, static or eager")
        if self.prefill not in ("auto", "slots", "eager"):
            raise ConfigError(f"unknown prefill mode {self.prefill!r}: use auto, slots or eager")
        for flag in ("overlap", "overlap_offloaded"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.compile not in (None, True, False):
            raise ConfigError(f"compile must be True, False or None (auto), got {self.compile!r}")
        if self.schedule not in ("auto", "fifo", "expert"):
            raise ConfigError(f"unknown schedule {self.schedule!r}: use auto, fifo or expert")
        if self.num_slots is not None:
            check_int("num_slots", self.num_slots, 1)
        check_int("max_wait", self.max_wait, 0)
        check_expert_dtype(self.expert_dtype)
        check_expert_dtype(self.miss_dtype, "miss_dtype", MISS_DTYPES)
        if self.miss_dtype != "none" and self.expert_dtype not in ("auto", "bf16"):
            raise ConfigError(
                f"miss_dtype {self.miss_dtype} computes misses beside full-precision slots, but expert_dtype is "
                f"{self.expert_dtype}: use expert_dtype bf16 with a miss_dtype, or no miss_dtype"
            )
        if isinstance(self.policy, str) and not self.policy.strip():
            raise ConfigError("policy must name a cache policy, e.g. lru")
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be True or False, got {self.progress!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict of plug-in options, got {type(self.extra).__name__}")
