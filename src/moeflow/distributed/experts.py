"""The experts call of an expert-parallel run: each rank computes the (token, expert) pairs whose expert it homes,
through its own slot pool, store and policy, and the partial outputs are summed over the ranks.

The dense layers are replicated and every rank runs the same tokens, so each rank already holds every token's
hidden state and routing: the all-to-all of the usual scheme (tokens sent to their experts' ranks, results sent
back) reduces to one all_reduce (sum) of the [T, H] partial outputs, a pair's result counted once, on its home
rank. The sum gives every rank the layer's full output, as the next (replicated) dense layer needs. The policy of
each rank observes the full routing (predictors keep their inputs) but is asked only for its homed experts, and its
prefetches of experts homed elsewhere are cancelled before the store sees them. Legend: T tokens, K top-k, E
experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moeflow.distributed.group import Group
from moeflow.experts.layer import OffloadedExperts, Runtime


@dataclass
class ParallelRuntime(Runtime):
    """A rank's ``Runtime``: the experts it homes, and the group its layers sum over."""

    mine: np.ndarray | None = None
    """[L, E] bool: the experts homed on this rank."""
    group: Group | None = None

    def prefetch_after(self, layer: int) -> None:
        """The policy's prefetches of homed experts start; the others are cancelled (another rank computes them)."""
        assert self.mine is not None
        keep = []
        for load in self.policy.prefetch(layer):
            if self.mine[load.key]:
                keep.append(load)
            else:
                self.policy.cancel(load)
        self.store.prefetch(keep, self.ctx.step, layer)


class ParallelExperts(OffloadedExperts):
    """``OffloadedExperts`` restricted to the rank's homed experts, its output summed over the ranks."""

    def __init__(self, layer: int, module: nn.Module, runtime: ParallelRuntime):
        super().__init__(layer, module, runtime)
        assert runtime.mine is not None and runtime.group is not None
        self.group = runtime.group
        self.homed = runtime.mine[layer]  # [E] bool
        self._homed_dev: torch.Tensor | None = None

    def _compute(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, needed: list[int]
    ) -> torch.Tensor:
        """The homed pairs' part of the layer's output, then the sum over the ranks (the layer's full output)."""
        mine = [e for e in needed if self.homed[e]]
        if mine:
            if len(mine) < len(
                needed
            ):  # pairs homed elsewhere: one of ours at zero weight, so they add nothing
                if self._homed_dev is None or self._homed_dev.device != index.device:
                    self._homed_dev = torch.as_tensor(self.homed, device=index.device)
                local = self._homed_dev[index]  # [T, K]
                index = torch.where(local, index, mine[0])
                weights = weights.masked_fill(~local, 0)
            part = super()._compute(hidden, index, weights, mine)
        else:
            part = hidden.new_zeros(hidden.shape)
        return self.group.all_reduce(part)


def attach_parallel(layers: list, runtime: ParallelRuntime) -> None:
    """Give each MoE layer's experts module its expert-parallel handler."""
    for spec in layers:
        spec.module.moeflow = ParallelExperts(spec.index, spec.module, runtime)
