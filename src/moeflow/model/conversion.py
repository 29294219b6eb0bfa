"""Which checkpoint tensors make each model tensor, derived from transformers' own checkpoint conversion mapping.

transformers loads a checkpoint by renaming every on-disk key (``WeightRenaming``) and, for keys that must be
merged or split, by collecting them under a ``WeightConverter`` whose operations (stack the per-expert tensors,
concatenate gate and up, transpose...) build the model's parameter. :class:`WeightMap` runs the same renaming over
the checkpoint's keys once, at open, and keeps for every model tensor its disk keys and operations. Dense tensors
are then built exactly as transformers builds them; an expert parameter ([E, ...]) is built for one expert at a
time by feeding the same operations only that expert's tensors (or its slice of a fused tensor), so a layer's
experts are never materialised together. Shapes are checked at open with meta tensors (no data is read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from moeflow.errors import CheckpointError, UnsupportedModelError
from moeflow.model.checkpoint import Checkpoint


@dataclass
class Source:
    """How one model tensor is made from checkpoint tensors."""

    name: str
    parts: dict[str, list[str]] = field(default_factory=dict)
    """Source pattern (the converter's, or the disk key for a plain renaming) -> disk keys, in transformers' order."""
    converter: WeightConverter | None = None
    layer_name: str = ""
    """The name transformers gives the converter's output (its first target): ops look shapes up by it."""

    def describe(self) -> str:
        keys = [k for ks in self.parts.values() for k in ks]
        shown = ", ".join(keys[:2]) + (f", ... ({len(keys)} tensors)" if len(keys) > 2 else "")
        ops = ", ".join(type(op).__name__ for op in self.converter.operations) if self.converter else "as is"
        return f"{self.name} <- {shown} [{ops}]"


class _TargetShapes:
    """Stands in for the model in operations that look a target's shape up (``Split``, ``Transpose(check_dims=True)``):
    shapes are taken at open, before the expert parameters leave the model; ``one_expert``: targets are [1, ...]."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], one_expert: bool):
        self._shapes, self._one = shapes, one_expert

    def get_parameter(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        return torch.empty((1, *shape[1:]) if self._one else shape, device="meta")


class WeightMap:
    """Model tensor name -> :class:`Source`, for every parameter and persistent buffer the checkpoint holds."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.model = model
        self.read_dense: Callable[[str], torch.Tensor] = ckpt.tensor
        """Reads a disk key for a dense tensor (a quantised checkpoint's reader dequantises; ``model.stored``)."""
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", "")
        targets = model.state_dict()
        self._shapes = {name: tuple(t.shape) for name, t in targets.items()}
        self.sources: dict[str, Source] = {}
        for key in sorted(ckpt.shard_of, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, targets)
            if name not in targets and key in targets:  # as transformers: a key already named as the model's
                name, pattern = rename_source_key(key, [], [], prefix, targets)
            if name not in targets:
                continue  # not a model tensor (e.g. multi-token-prediction layers, rotary caches)
            converter = (
                next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
            )
            for target in self._targets(name, converter):
                source = self.sources.setdefault(target, Source(target, converter=converter, layer_name=name))
                source.parts.setdefault(pattern or key, []).append(key)

    @staticmethod
    def _targets(name: str, converter: WeightConverter | None) -> list[str]:
        """A one-to-many converter (one disk tensor split into several parameters) renames to its first target."""
        if converter is None or len(converter.target_patterns) == 1:
            return [name]
        first = converter.target_patterns[0]
        return [name.replace(first, t) for t in converter.target_patterns]

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    # ------------------------------------------------------------------ building tensors
    def _run(
        self, source: Source, inputs: dict[str, list[torch.Tensor]], model: _TargetShapes
    ) -> torch.Tensor:
        conv = source.converter
        if conv is None:
            return next(iter(inputs.values()))[0]
        out: dict[str, Any] = inputs
        for op in conv.operations:
            out = op.convert(
                out,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=source.layer_name,
                model=model,
                config=self.model.config,
                missing_keys=None,
            )
        matches = [k for k in out if k in source.name]
        value = out[max(matches, key=len)] if matches else None
        if value is None:
            raise UnsupportedModelError(f"cannot tell which output of {source.describe()} is {source.name}")
        return value[0] if isinstance(value, list) else value

    def dense(self, name: str, meta: bool = False) -> torch.Tensor:
        """Model tensor ``name`` built from the checkpoint (CPU, checkpoint dtype); ``meta``: shape only."""
        source = self.sources[name]
        read = self._meta if meta else self.read_dense
        inputs = {p: [read(k) for k in keys] for p, keys in source.parts.items()}
        return self._run(source, inputs, _TargetShapes(self._shapes, one_expert=False))

    def expert(
        self, name: str, num_experts: int, e: int, meta: bool = False,
        read: Callable[[str, int | None], torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Expert ``e``'s slice of the 3-D model parameter ``name`` ([E, ...] -> [...]), reading only that expert.
        ``read(key, None)`` / ``read(key, e)`` replaces reading a per-expert tensor / expert ``e``'s [1, ...] slice of a
        fused one (a quantised checkpoint builds its codes and its scales through the same conversion ops)."""
        source = self.sources[name]
        inputs: dict[str, list[torch.Tensor]] = {}
        for pattern, keys in source.parts.items():
            if len(keys) == num_experts:  # one tensor per expert
                if meta:
                    inputs[pattern] = [self._meta(keys[e])]
                else:
                    inputs[pattern] = [read(keys[e], None) if read else self.ckpt.tensor(keys[e])]
            elif len(keys) == 1 and self.ckpt.shape(keys[0])[:1] == [num_experts]:  # fused [E, ...]
                key = keys[0]
                one = torch.empty([1, *self.ckpt.shape(key)[1:]], device="meta") if meta else None
                if one is None:
                    one = read(key, e) if read else self.ckpt.slice0(key, e).unsqueeze(0)
                inputs[pattern] = [one]
            else:
                found = len(keys) if len(keys) > 1 else self.ckpt.shape(keys[0])[0]
                raise CheckpointError(
                    f"{source.describe()}: the checkpoint holds {found} experts ({pattern}) but the config says "
                    f"{num_experts}: the config does not match the weights, or a shard is missing from the index"
                )
        if source.converter is None:
            return next(iter(inputs.values()))[0][0]
        return self._run(source, inputs, _TargetShapes(self._shapes, one_expert=True))[0]

    def expert_keys(self, name: str, num_experts: int, e: int) -> list[tuple[str, bool]]:
        """(disk key, fused) pairs read for expert ``e`` of ``name`` (for byte accounting)."""
        source = self.sources[name]
        return [
            (keys[e], False) if len(keys) == num_experts else (keys[0], True)
            for keys in source.parts.values()
        ]

    def _meta(self, key: str) -> torch.Tensor:
        return torch.empty(self.ckpt.shape(key), device="meta")
