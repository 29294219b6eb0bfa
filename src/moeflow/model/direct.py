"""Expert parameters whose bytes are their checkpoint tensors' bytes, back to back: read straight into the row.

Building one expert's parameter through transformers' conversion operations (``model.conversion``) makes copies:
each disk tensor is read into a buffer, stacked, concatenated (OLMoE's gate and up), then copied into the row. On a
CPU those buffers (two to three times the expert, at once) are RSS beyond the memory budget at every miss. Where
the operations only put the disk tensors one after the other (a stack of one expert, a concatenation along its
first dimension, in the order the parts are read), the row is the disk bytes themselves: each part is read from the
checkpoint into its own stretch of the row, no buffer between. Whether that holds is found once, at open, by running
the operations on index tensors (0, 1, 2, ... across the parts) and checking that they come out in order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from moeflow.model.conversion import WeightMap

if TYPE_CHECKING:
    from moeflow.model.loader import LoadedModel


def _part_shapes(weights: WeightMap, name: str, num_experts: int) -> list[list[int]] | None:
    """Shapes of one expert's parts of ``name``, in read order ([1, ...] for a fused tensor's slice), or None when
    the parts are not one tensor per expert or one fused [E, ...] tensor each."""
    shapes = []
    for keys in weights.sources[name].parts.values():
        if len(keys) == num_experts:
            shapes.append(list(weights.ckpt.shape(keys[0])))
        elif len(keys) == 1 and weights.ckpt.shape(keys[0])[:1] == [num_experts]:
            shapes.append([1, *weights.ckpt.shape(keys[0])[1:]])
        else:
            return None
    return shapes


def _in_order(weights: WeightMap, name: str, num_experts: int, shapes: list[list[int]]) -> bool:
    """Run the conversion of expert 0 of ``name`` on index tensors: True when its output is 0, 1, 2, ... (the parts'
    elements, one part after the other)."""
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + math.prod(shape))
    if starts[-1] >= 2**31:
        return False
    calls = iter(range(len(shapes)))

    def index(_key: str, _expert: int | None) -> torch.Tensor:
        i = next(calls)
        return torch.arange(starts[i], starts[i + 1], dtype=torch.int32).view(shapes[i])

    try:
        out = weights.expert(name, num_experts, 0, read=index)
    except (RuntimeError, TypeError, ValueError, StopIteration):  # an operation that needs real weights
        return False
    return out.numel() == starts[-1] and torch.equal(
        out.reshape(-1), torch.arange(starts[-1], dtype=torch.int32)
    )


def direct_params(weights: WeightMap, paths: list[str], params: list[str], num_experts: int,
                  dtype: torch.dtype) -> frozenset[str]:  # fmt: skip
    """The expert parameter names (of ``params``) that every MoE layer at ``paths`` can read straight into the row:
    stored in ``dtype``, built by putting their parts one after the other (tested on the first layer; every other
    layer must have the same converter and part shapes)."""
    found = set()
    for param in params:
        names = [f"{path}.{param}" for path in paths]
        if any(name not in weights for name in names):
            continue
        first = weights.sources[names[0]]
        shapes = _part_shapes(weights, names[0], num_experts)
        if shapes is None or not _in_order(weights, names[0], num_experts, shapes):
            continue
        same = all(
            weights.sources[n].converter is first.converter
            and _part_shapes(weights, n, num_experts) == shapes
            for n in names[1:]
        )
        stored = {
            weights.ckpt.dtype(k) for n in names for keys in weights.sources[n].parts.values() for k in keys
        }
        if same and stored == {dtype}:
            found.add(param)
    return frozenset(found)


def read_direct(lm: LoadedModel, layer: int, expert: int, name: str, out: torch.Tensor) -> int:
    """Read expert ``expert``'s parts of model tensor ``name`` into ``out`` (its stretch of the row), one after the
    other; returns the bytes read."""
    offset, nbytes = 0, 0
    for key, fused in lm.weights.expert_keys(name, lm.num_experts, expert):
        shape = lm.checkpoint.shape(key)
        count = math.prod(shape[1:]) if fused else math.prod(shape)
        lm.checkpoint.read_into(key, out[offset : offset + count], expert if fused else None)
        offset += count
        nbytes += count * out.element_size()
    if offset != out.numel():
        raise ValueError(f"the parts of {name} hold {offset} elements, its row stretch {out.numel()}")
    return nbytes
