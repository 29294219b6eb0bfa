"""The flat layout of one expert: every parameter slice of it back to back in one buffer (``ExpertLayout``), the
same for every expert of a model, so the store reads, copies and computes with one row per expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSlice:
    """One parameter of an expert inside the expert's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Flat layout of one expert (identical for every expert of the model)."""

    params: tuple[ParamSlice, ...]
    numel: int

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter views into ``flat`` [N, numel] -> {name: [N, *shape]}."""
        return {
            p.name: flat[:, p.offset : p.offset + p.numel].view(flat.shape[0], *p.shape) for p in self.params
        }
