"""``ParallelLLM``: the engine on one rank of an expert-parallel run (one process per device).

Every rank loads the dense weights (replicated) and runs the same requests step by step; its store and policy hold
only the experts the placement homes on it (``--cache-size`` and ``--device-memory`` are per rank), and each MoE
layer sums the ranks' partial outputs (``moeflow.distributed.experts``). Decode is eager: the static slot-table
step has no collective yet. Unseeded sampling draws from one seed chosen by rank 0, so every rank samples the same
tokens from the same (all-reduced) logits; each generate ends by checking that the ranks agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

import torch

from moeflow.config import EngineConfig
from moeflow.distributed.experts import ParallelRuntime, attach_parallel
from moeflow.distributed.group import Group, init_group
from moeflow.distributed.placement import Placement, from_trace, uniform
from moeflow.engine.llm import LLM, resolve_device
from moeflow.errors import DistributedError, RequestError
from moeflow.experts.layer import Runtime
from moeflow.experts.store import ExpertStore
from moeflow.metrics import Counters
from moeflow.routing.trace import Trace, TraceRecorder, TraceReplay
from moeflow.sampling import SamplingParams
from moeflow.sequence import RequestOutput

PLACEMENT_OPTION = "placement_trace"
"""``EngineConfig.extra`` key (``--option placement_trace=PATH``): a routing trace to place the experts from."""


def rank_device(name: str, group: Group) -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run (one process per GPU), else the CPU."""
    return f"cuda:{group.local_rank}" if group.backend == "nccl" else "cpu"


class ParallelLLM(LLM):
    """``LLM`` on one rank of ``group``: the experts homed here (``placement``) and a sum over the ranks per layer."""

    def __init__(
        self,
        model: str | Path,
        *,
        group: Group,
        placement_trace: Trace | None = None,
        config: EngineConfig | None = None,
        **options: Any,
    ):
        """``options``: ``LLM``'s keywords (``batch_size``, ``record_trace``, ``replay``)."""
        cfg = config or EngineConfig()
        if cfg.decode in ("graph", "static"):
            raise RequestError(
                f"--decode {cfg.decode} is not available with several processes: use --decode eager (the default)"
            )
        self.group = group
        if placement_trace is None and PLACEMENT_OPTION in cfg.extra:
            placement_trace = Trace.load(str(cfg.extra[PLACEMENT_OPTION]))
        self._placement_trace = placement_trace
        cfg = dataclasses.replace(cfg, decode="eager", device=rank_device(cfg.device, group))
        super().__init__(model, config=cfg, **options)
        torch.manual_seed(group.broadcast_int(random.SystemRandom().randrange(2**62)))

    def _runtime(self, recorder: TraceRecorder | None, replay: TraceReplay | None) -> Runtime:
        lm, cfg, rank = self.loaded, self.config, self.group.rank
        num_layers, num_experts = len(lm.layers), lm.num_experts
        if self._placement_trace is not None:
            self.placement: Placement = from_trace(self._placement_trace, num_layers, num_experts,
                                                   self.group.world_size)  # fmt: skip
        else:
            self.placement = uniform(num_layers, num_experts, self.group.world_size)
        keys = self.placement.keys(rank)
        slots = max(min(self.memory.num_slots, len(keys)), 1)
        host = min(self.memory.host_capacity, len(keys))
        self.memory = dataclasses.replace(
            self.memory, num_slots=slots, host_capacity=host, total_experts=len(keys)
        )
        store = ExpertStore(lm, slots, host, cfg.progress, serves=keys)
        policy = self._policy(cfg.policy, slots, cfg.extra)
        runtime = ParallelRuntime(store, policy, cfg.expert_backend, recorder, replay,
                                  mine=self.placement.mine(rank), group=self.group)  # fmt: skip
        attach_parallel(lm.layers, runtime)
        return runtime

    def _counters(self) -> Counters:
        """The run's counters summed over the ranks (stall: the longest of any rank)."""
        *counts, stall = super()._counters()
        summed = self.group.all_reduce(torch.tensor([float(c) for c in counts], dtype=torch.float64,
                                                    device=self.group.device))  # fmt: skip
        longest = self.group.all_reduce(
            torch.tensor([stall], dtype=torch.float64, device=self.group.device), "max"
        )
        hits, misses, prefetches, to_device, from_disk = (int(c) for c in summed.tolist())
        return hits, misses, prefetches, to_device, from_disk, float(longest.item())

    def reconfigure(
        self, policy: Any = None, num_slots: int | None = None, options: dict | None = None
    ) -> None:
        raise RequestError("reconfigure is not available with several processes: start a new run instead")

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | None = None,
        request_ids: list[int] | None = None,
    ) -> list[RequestOutput]:
        """``LLM.generate`` on every rank; then the ranks check they generated the same tokens."""
        outputs = super().generate(prompts, params, request_ids)
        digest = hashlib.sha256(repr([o.token_ids for o in outputs]).encode()).digest()
        if not self.group.all_equal(int.from_bytes(digest[:7], "little")):
            raise DistributedError(
                f"rank {self.group.rank}: the ranks generated different tokens (their logits differed): "
                "report this with the command line"
            )
        return outputs


def parallel_llm(model: str | Path, config: EngineConfig, **kwargs: Any) -> ParallelLLM:
    """Join the process group of torchrun's environment (NCCL for a CUDA device, else gloo) and build this rank's
    engine."""
    device = resolve_device(config.device)
    return ParallelLLM(model, group=init_group(device.type), config=config, **kwargs)
