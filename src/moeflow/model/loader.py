"""Build a transformers model with dense weights on the compute device and experts left on disk.

The model class comes from ``transformers`` (``AutoModelForCausalLM.from_config`` on the meta device, with
``experts_implementation="moeflow"``); dense tensors are read from the checkpoint straight onto the device; each MoE
layer's expert parameters are dropped from the module and described by an :class:`ExpertLayout` so the store can read
one expert at a time (one flat buffer per expert: every parameter slice of that expert, back to back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moeflow.errors import CheckpointError, UnsupportedModelError
from moeflow.experts.dispatch import IMPLEMENTATION
from moeflow.model.checkpoint import Checkpoint
from moeflow.model.families import Family, disk_names, family_for


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


@dataclass
class MoELayer:
    """One MoE layer of the model: its experts module and where each expert's tensors are on disk."""

    index: int
    """MoE layer index (0..L-1)."""
    layer_id: int
    """Transformer layer index."""
    path: str
    module: nn.Module
    sources: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    """param -> [(disk name pattern with {e}, fused)]: fused tensors are sliced at dim 0, per-expert ones concatenated."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: PretrainedConfig
    checkpoint: Checkpoint
    family: Family
    layers: list[MoELayer]
    layout: ExpertLayout
    num_experts: int
    top_k: int
    dtype: torch.dtype
    device: torch.device
    dense_bytes: int

    @property
    def expert_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize

    def read_expert(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Read expert ``expert`` of MoE layer ``layer`` from disk into flat ``out`` [numel]; returns bytes read."""
        spec, nbytes = self.layers[layer], 0
        for p in self.layout.params:
            parts = []
            for pattern, fused in spec.sources[p.name]:
                if fused:
                    parts.append(self.checkpoint.slice0(pattern, expert))
                    nbytes += parts[-1].numel() * parts[-1].element_size()
                else:
                    name = pattern.format(e=expert)
                    parts.append(self.checkpoint.tensor(name))
                    nbytes += self.checkpoint.nbytes(name)
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[p.offset : p.offset + p.numel].copy_(value.reshape(-1))
        return nbytes


def resolve_dtype(requested: str, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """The compute dtype: ``requested``, or for "auto" the checkpoint's own dtype (so a bf16 checkpoint stays bf16
    in RAM on a CPU), except that a float32 checkpoint computes in bfloat16 on an accelerator."""
    if requested != "auto":
        from moeflow.validate import check_dtype

        return getattr(torch, check_dtype(requested))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        return dtype
    return torch.bfloat16 if dtype == torch.float32 else dtype


def open_model(path: str, device: torch.device, dtype: str = "auto") -> LoadedModel:
    """Open the checkpoint and build the model on the meta device; nothing is read from disk but headers."""
    ckpt = Checkpoint(path)
    model_type = ckpt.config_dict.get("model_type", "?")
    family = family_for(model_type)
    config = AutoConfig.from_pretrained(ckpt.path)
    torch_dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, experts_implementation=IMPLEMENTATION
        )
    model.eval()
    layers = _find_moe_layers(model, ckpt, family)
    layout = _layout(layers[0].module)
    for layer in layers:
        for p in layout.params:  # drop the 3-D expert parameters: experts live in the store
            del layer.module._parameters[p.name]
    module = layers[0].module
    num_experts = int(getattr(module, "num_experts", 0) or 0)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "top_k", 0) or 0)
    if not num_experts or not top_k:
        raise UnsupportedModelError(
            f"cannot tell the expert count or top-k of {model_type} from {path}/config.json"
        )
    dense_bytes = sum(p.numel() for p in model.parameters()) * torch_dtype.itemsize
    return LoadedModel(
        model, config, ckpt, family, layers, layout, num_experts, top_k, torch_dtype, device, dense_bytes
    )


def load_dense(loaded: LoadedModel, progress: bool = True) -> None:
    """Read the dense weights onto the device and rebuild construction-time buffers there."""
    loaded.dense_bytes = _load_dense(
        loaded.model, loaded.checkpoint, loaded.family, loaded.device, loaded.dtype, progress
    )
    _materialise_buffers(loaded.model, loaded.device)
    loaded.model.tie_weights()


def _find_moe_layers(model: nn.Module, ckpt: Checkpoint, family: Family) -> list[MoELayer]:
    found = []
    for path, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if "down_proj" in params and params["down_proj"].dim() == 3:
            layer_id = next((int(p) for p in path.split(".") if p.isdigit()), len(found))
            found.append(MoELayer(len(found), layer_id, path, module))
    if not found:
        raise UnsupportedModelError(
            "this model has no MoE layers with 3-D expert weights; nothing to offload"
        )
    for layer in found:
        for name, param in layer.module.named_parameters(recurse=False):
            layer.sources[name] = _expert_sources(ckpt, family, layer, name, param.shape[0])
    return found


def _expert_sources(
    ckpt: Checkpoint, family: Family, layer: MoELayer, name: str, e: int
) -> list[tuple[str, bool]]:
    for disk in disk_names(family, f"{layer.path}.{name}"):
        if disk in ckpt:
            if ckpt.shape(disk)[0] != e:
                raise CheckpointError(f"{disk} holds {ckpt.shape(disk)[0]} experts but config.json says {e}")
            return [(disk, True)]
    parts = family.expert_parts.get(name)
    if parts:
        for base in disk_names(family, layer.path):
            patterns = [f"{base}.{{e}}.{suffix}" for suffix in parts]
            if all(p.format(e=i) in ckpt for p in patterns for i in range(e)):
                return [(p, False) for p in patterns]
    raise CheckpointError(
        f"the checkpoint lacks the experts of {layer.path} ({name}) for {e} experts: the config does not match the "
        "weights, or a shard is missing from the index"
    )


def _layout(module: nn.Module) -> ExpertLayout:
    params, offset = [], 0
    for name, p in module.named_parameters(recurse=False):
        params.append(ParamSlice(name, tuple(p.shape[1:]), offset))
        offset += params[-1].numel
    return ExpertLayout(tuple(params), offset)


def _load_dense(
    model: nn.Module,
    ckpt: Checkpoint,
    family: Family,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> int:
    """Parameters (and persistent buffers found on disk, e.g. DeepSeek-V3's score bias) onto ``device``."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    total = 0
    tensors = [(n, t, True) for n, t in model.named_parameters()]
    tensors += [
        (n, t, False) for n, t in model.named_buffers() if any(d in ckpt for d in disk_names(family, n))
    ]
    for name, param, is_param in tqdm(
        tensors, desc="dense weights", unit="tensor", disable=not progress, leave=False
    ):
        disk = next((n for n in disk_names(family, name) if n in ckpt), None)
        if disk is None:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise CheckpointError(
                f"the checkpoint has no tensor for {name}: config.json does not match the weights"
            )
        value = ckpt.tensor(disk)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{disk} has shape {tuple(value.shape)} but the config implies {tuple(param.shape)}: "
                "config.json does not match the weights"
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


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed at construction (rotary frequencies) were made on meta: rebuild their modules on device."""
    for path, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            config: Any = getattr(module, "config", None)
            if config is None or any(True for _ in module.parameters(recurse=False)):
                raise UnsupportedModelError(f"cannot rebuild buffers of {path} ({type(module).__name__})")
            with torch.device(device):
                fresh = type(module)(config)
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, fresh)
    for name, b in model.named_buffers():
        if b.device != device:
            module_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_path)
            owner._buffers[leaf] = b.to(device)
