"""The static state of one batch shape of the static decode path (a bucket): its KV cache, the step's input and
output buffers at fixed addresses (a captured graph reads and writes them), and the host staging of its inputs.
Legend: B rows, V vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moeflow.engine.kv import StaticKV
from moeflow.experts.layer import StaticBuffers

if TYPE_CHECKING:
    from moeflow.engine.step_io import HostCopies


@dataclass
class Bucket:
    """Static state of one batch shape; its tensors keep their addresses for the graph."""

    kv: StaticKV
    bufs: StaticBuffers
    inputs: torch.Tensor  # [3, B] input token, position and liveness (0/1) of each row, uploaded in one copy
    logits: torch.Tensor  # [B, V]
    staging: torch.Tensor  # [3, B] its host copy (pinned on a GPU)
    graph: torch.cuda.CUDAGraph | None = None
    route_host: HostCopies | None = None  # host copies of the step's results, reused
    replay_host: tuple[torch.Tensor, torch.Tensor] | None = None  # pinned staging of replayed routing
    lanes: Any = None
    """The overlapped decode's two sets of host buffers (``engine/overlap.py``), made at its first step."""

    @property
    def decoded(self) -> bool:
        """Whether a decode step has been read back from this bucket (serially, or overlapped)."""
        return self.route_host is not None or self.lanes is not None

    @property
    def pos(self) -> torch.Tensor:  # [B, 1] each row's position (a view of ``inputs``: its address is fixed)
        return self.inputs[1, :, None]


def feed(staging: torch.Tensor, tokens: list[int], positions: list[int], live: list[int]) -> None:
    """Write a step's inputs into ``staging`` [3, B]: row ``b`` feeds ``tokens[b]`` at ``positions[b]``, and only the
    ``live`` rows count. The caller makes sure the last upload from ``staging`` has been read."""
    st = staging.numpy()
    st[0] = tokens
    st[1] = positions
    st[2] = 0
    st[2, live] = 1
