"""The dense part of a model built on the meta device, made real on the compute device: its parameters (and the
persistent buffers the checkpoint holds) read from disk (``read_dense``), the buffers computed at construction
rebuilt there (``materialise_buffers``), and the CPU output head's input hook (``standard_strides``).
``loader.load_dense`` runs them in that order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeflow.errors import CheckpointError, UnsupportedModelError
from moeflow.model.conversion import WeightMap


def read_dense(
    model: nn.Module, weights: WeightMap, device: torch.device, dtype: torch.dtype, progress: bool
) -> int:
    """Parameters (and persistent buffers found on disk, e.g. DeepSeek-V3's score bias) onto ``device``."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    total = 0
    tensors = [(n, t, True) for n, t in model.named_parameters()]
    tensors += [(n, t, False) for n, t in model.named_buffers() if n in weights]
    for name, param, is_param in tqdm(
        tensors, desc="dense weights", unit="tensor", disable=not progress, leave=False
    ):
        if name not in weights:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise CheckpointError(
                f"the checkpoint has no tensor for {name}: config.json does not match the weights"
            )
        value = weights.dense(name)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{weights.sources[name].describe()} has shape {tuple(value.shape)} but the config implies "
                f"{tuple(param.shape)}: config.json does not match the weights"
            )
        target = value.to(
            device=device, dtype=dtype if is_param and param.dtype.is_floating_point else param.dtype
        )
        module_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_path)
        if is_param:
            owner._parameters[leaf] = nn.Parameter(target, requires_grad=False)
        else:
            owner._buffers[leaf] = target
        total += target.numel() * target.element_size()
    return total


def materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed at construction (rotary frequencies) were made on meta: rebuild their modules on device."""
    for path, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            config: Any = getattr(module, "config", None)
            if config is None or any(True for _ in module.parameters(recurse=False)):
                _initialise_buffers(model, module, path, device)
                continue
            with torch.device(device):
                fresh = type(module)(config)
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, fresh)
    for name, b in model.named_buffers():
        if b.device != device:
            module_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_path)
            owner._buffers[leaf] = b.to(device)


def _initialise_buffers(model: nn.Module, module: nn.Module, path: str, device: torch.device) -> None:
    """A module with loaded parameters and construction-time buffers (e.g. Gemma's embedding scale): allocate the
    buffers on ``device`` and let the model's own ``_init_weights`` fill them, its parameters hidden behind meta
    stand-ins so that what was loaded stays untouched."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise UnsupportedModelError(f"cannot rebuild buffers of {path} ({type(module).__name__})")
    loaded = dict(module._parameters)
    for name, p in loaded.items():
        if p is not None:
            module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for name, b in module._buffers.items():
        if b is not None and b.is_meta:
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    try:
        init(module)
    finally:
        module._parameters.update(loaded)


def standard_strides(module: nn.Module, args: tuple) -> tuple | None:
    """The output head's input with row-major strides. transformers slices the last position out of the hidden
    states ([B, T, H] -> [B, 1, H], a view with strides (T*H, H, 1)); on the CPU torch's bf16 linear then copied
    the whole head weight (a transient of the weight's size, or twice it as float32, measured on the test machine:
    tests/test_rss.py), which a copy of the few input rows avoids."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    standard = [1]
    for size in reversed(x.shape[1:]):
        standard.insert(0, standard[0] * size)
    return (
        None if list(x.stride()) == standard else (x.clone(memory_format=torch.contiguous_format), *args[1:])
    )
