"""Build a transformers model with dense weights on the compute device and experts left on disk.

The model class comes from ``transformers`` (``AutoModelForCausalLM.from_config`` on the meta device, with
``experts_implementation="moeflow"``). Its MoE layers are the modules that dispatch through transformers' experts
interface (:mod:`moeflow.model.families`); which checkpoint tensors make each parameter comes from transformers' own
conversion mapping (:mod:`moeflow.model.conversion`). Dense tensors are read straight onto the device
(:mod:`moeflow.model.dense`); each MoE layer's 3-D expert parameters are dropped from the module and described by an
:class:`ExpertLayout`, so the store can read one expert at a time (one flat buffer per expert: every parameter slice
of it, back to back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moeflow import malloc
from moeflow.errors import CheckpointError, UnsupportedModelError
from moeflow.model.checkpoint import Checkpoint
from moeflow.model.conversion import WeightMap
from moeflow.model.dense import materialise_buffers, read_dense, standard_strides
from moeflow.model.direct import direct_params, read_direct
from moeflow.model.dispatch import IMPLEMENTATION
from moeflow.model.families import experts_modules, refusal, top_k_of
from moeflow.model.layout import ExpertLayout, ParamSlice
from moeflow.model.rows import Codecs, check_stored_rows, choose_codecs, read_row
from moeflow.model.stored import Stored, dense_reader, detect


@dataclass
class MoELayer:
    """One MoE layer of the model: its experts module (transformers computes the router, shared experts and
    biases around it, from the dense part)."""

    index: int
    """MoE layer index (0..L-1)."""
    layer_id: int
    """Transformer layer index."""
    path: str
    module: nn.Module
    top_k: int


@dataclass
class LoadedModel:
    model: nn.Module
    config: PretrainedConfig
    checkpoint: Checkpoint
    weights: WeightMap
    layers: list[MoELayer]
    layout: ExpertLayout
    num_experts: int
    top_k: int
    dtype: torch.dtype
    device: torch.device
    dense_bytes: int
    stored: Stored | None = None
    """The quantised form the checkpoint stores its experts in (None: full precision)."""
    codecs: Codecs = field(default_factory=lambda: Codecs(None, None, None))
    """Row forms: as stored, as held in the host pool and slots, the low-precision miss copy (``model.rows``)."""
    direct: frozenset[str] = frozenset()
    """Expert parameters read from disk straight into the row (``model.direct``): no conversion buffers."""

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert as the host pool and the slots hold it."""
        host = self.codecs.host
        return host.nbytes if host is not None else self.layout.numel * self.dtype.itemsize

    @property
    def quantises_on_read(self) -> bool:
        """Reading an expert from the checkpoint runs a quantisation fit (best done once, into the host pool)."""
        return self.codecs.host is not None and self.codecs.host is not self.codecs.stored

    def read_expert(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Read expert ``expert`` of MoE layer ``layer`` from disk into ``out``, a row of the host form; returns
        the bytes read."""
        return read_row(self, layer, expert, out, self.codecs.host)

    def read_full(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Read expert ``expert`` of MoE layer ``layer`` from a full-precision checkpoint into flat ``out`` [numel];
        returns bytes read."""
        path, nbytes = self.layers[layer].path, 0
        for p in self.layout.params:
            name = f"{path}.{p.name}"
            if p.name in self.direct and out.dtype == self.dtype:
                nbytes += read_direct(self, layer, expert, name, out[p.offset : p.offset + p.numel])
                continue
            value = self.weights.expert(name, self.num_experts, expert)
            out[p.offset : p.offset + p.numel].copy_(value.reshape(-1))
            for key, fused in self.weights.expert_keys(name, self.num_experts, expert):
                nbytes += self.checkpoint.nbytes(key) // (self.num_experts if fused else 1)
        return nbytes


SMALL_ON_CPU = 2**30
"""On a CPU, "auto" computes a checkpoint whose float32 copy fits in this many bytes in float32: there the demo model
decoded 3-15% faster in float32 than in bf16 (a small model's float32 copy costs little RAM), while a 2-layer
Qwen3-30B-A3B-geometry checkpoint decoded 2.4x faster in bf16 at 25% cached (half the bytes to move);
benchmarks/results/cpu-speed.json."""


def resolve_dtype(
    requested: str, config: PretrainedConfig, device: torch.device, weight_bytes: int | None = None
) -> torch.dtype:
    """The compute dtype: ``requested``, or for "auto" the checkpoint's own dtype (so a bf16 checkpoint stays bf16
    in RAM on a CPU), except that a float32 checkpoint computes in bfloat16 on an accelerator and a small
    checkpoint (``weight_bytes`` in float32 within ``SMALL_ON_CPU``) computes in float32 on a CPU."""
    if requested != "auto":
        from moeflow.validate import check_dtype

        return getattr(torch, check_dtype(requested))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        small = weight_bytes is not None and weight_bytes * 4 // dtype.itemsize <= SMALL_ON_CPU
        return torch.float32 if small else dtype
    return torch.bfloat16 if dtype == torch.float32 else dtype


def open_model(
    path: str, device: torch.device, dtype: str = "auto", expert_dtype: str = "auto", miss_dtype: str = "none"
) -> LoadedModel:
    """Open the checkpoint and build the model on the meta device; nothing is read from disk but headers.
    ``expert_dtype`` / ``miss_dtype``: the form experts are held in (see ``model.rows``)."""
    ckpt = Checkpoint(path)
    stored = detect(ckpt.config_dict)
    model_type = ckpt.config_dict.get("model_type", "?")
    config = AutoConfig.from_pretrained(ckpt.path)
    weight_bytes = sum(ckpt.nbytes(name) for name in ckpt.shard_of)
    torch_dtype = resolve_dtype(dtype, config, device, weight_bytes)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, experts_implementation=IMPLEMENTATION
            )
        except ValueError as exc:  # no causal-LM class, or experts that take no experts_implementation
            if "experts_implementation" not in str(exc) and "Unrecognized configuration" not in str(exc):
                raise
            raise UnsupportedModelError(
                f"model type {model_type!r} cannot be built for offloading: {exc}"
            ) from None
    model.eval()
    found = experts_modules(model)
    if not found:
        raise refusal(model_type, model)
    weights = WeightMap(model, ckpt)
    weights.read_dense = dense_reader(stored, ckpt)
    layers = [MoELayer(i, _layer_id(p, i), p, m, top_k_of(model, p)) for i, (p, m) in enumerate(found)]
    layout = _layout(layers[0].module)
    num_experts = _num_experts(layers[0].module)
    covered = stored.covered(layout) if stored is not None else set()
    transposed = bool(getattr(layers[0].module, "is_transposed", False))
    codecs = choose_codecs(stored, layout, transposed, expert_dtype, miss_dtype)
    for layer in layers:
        _check_experts(weights, layer, layout, num_experts, covered)
        for p in layout.params:  # drop the 3-D expert parameters: experts live in the store
            del layer.module._parameters[p.name]
    dense_bytes = sum(p.numel() for p in model.parameters()) * torch_dtype.itemsize
    paths, names = [layer.path for layer in layers], [p.name for p in layout.params]
    direct = direct_params(weights, paths, names, num_experts, torch_dtype) if stored is None else frozenset()
    top_k = max(layer.top_k for layer in layers)
    loaded = LoadedModel(model, config, ckpt, weights, layers, layout, num_experts, top_k, torch_dtype, device,
                         dense_bytes, stored, codecs, direct)  # fmt: skip
    check_stored_rows(loaded)
    return loaded


def load_dense(loaded: LoadedModel, progress: bool = True) -> None:
    """Read the dense weights onto the device and rebuild construction-time buffers there. On a CPU, large freed
    blocks go back to the system from here on and the heaps are trimmed after (``moeflow.malloc``)."""
    if loaded.device.type == "cpu":
        malloc.return_large_blocks()
    loaded.dense_bytes = read_dense(loaded.model, loaded.weights, loaded.device, loaded.dtype, progress)
    materialise_buffers(loaded.model, loaded.device)
    loaded.model.tie_weights()
    head = loaded.model.get_output_embeddings()
    if loaded.device.type == "cpu" and head is not None:
        head.register_forward_pre_hook(standard_strides)
    if loaded.device.type == "cpu":
        malloc.trim()


def _layer_id(path: str, index: int) -> int:
    return next((int(p) for p in path.split(".") if p.isdigit()), index)


def _num_experts(module: nn.Module) -> int:
    sizes = {p.shape[0] for p in module.parameters(recurse=False)}
    n = int(getattr(module, "num_experts", 0) or 0) or (sizes.pop() if len(sizes) == 1 else 0)
    if not n:
        raise UnsupportedModelError(f"cannot tell the expert count of {type(module).__name__}")
    return n


def _check_experts(
    weights: WeightMap, layer: MoELayer, layout: ExpertLayout, num_experts: int, covered: set[str]
) -> None:
    """Every expert parameter of ``layer`` (but those a quantised checkpoint holds in its own form) has a source
    that builds one expert of the right shape (meta dry run)."""
    for p in layout.params:
        if p.name in covered:
            continue
        name = f"{layer.path}.{p.name}"
        if name not in weights:
            raise CheckpointError(
                f"the checkpoint lacks the experts of {layer.path} ({p.name}): the config does not match the "
                "weights, or a shard is missing from the index"
            )
        shape = tuple(weights.expert(name, num_experts, 0, meta=True).shape)
        if shape != p.shape:
            raise CheckpointError(
                f"{weights.sources[name].describe()} builds experts of shape {shape} but the config implies "
                f"{p.shape}: config.json does not match the weights"
            )


def _layout(module: nn.Module) -> ExpertLayout:
    params, offset = [], 0
    for name, p in module.named_parameters(recurse=False):
        params.append(ParamSlice(name, tuple(p.shape[1:]), offset))
        offset += params[-1].numel
    return ExpertLayout(tuple(params), offset)
