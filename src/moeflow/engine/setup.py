"""What an engine is built from, besides its config: the device it runs on (``resolve_device``), the shape of the
model it loaded (``ModelInfo``), the trace recorder of its MoE layers (``make_recorder``) and the checkpoint's
tokenizer, if it has one (``load_tokenizer``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeflow.errors import RequestError
from moeflow.model.loader import LoadedModel
from moeflow.routing.trace import TraceRecorder


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    num_layers: int
    """MoE layers."""
    num_experts: int
    top_k: int
    moe_layer_ids: tuple[int, ...]
    expert_bytes: int
    dense_bytes: int

    @staticmethod
    def of(lm: LoadedModel) -> ModelInfo:
        ids = tuple(layer.layer_id for layer in lm.layers)
        return ModelInfo(lm.config.model_type, len(lm.layers), lm.num_experts, lm.top_k, ids, lm.expert_bytes,
                         lm.dense_bytes)  # fmt: skip


def make_recorder(model_dir: str, lm: LoadedModel) -> TraceRecorder:
    """A recorder of the routing of ``lm``'s MoE layers (``record_trace=True``)."""
    ids = [layer.layer_id for layer in lm.layers]
    return TraceRecorder(Path(model_dir).name, len(lm.layers), lm.num_experts, lm.top_k, ids)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def load_tokenizer(model_dir: str) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((Path(model_dir) / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
