"""A Hugging Face checkpoint directory on disk: its config, its safetensors shards (memory-mapped), validation.

Tensors are read lazily through ``safe_open`` handles kept open for the engine's life; one expert's slice of a fused
3-D tensor is read with ``get_slice`` so a whole layer's experts are never materialised.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeflow.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# config.json fields that, when present, must be positive integers (a wrong type fails deep inside transformers)
POSITIVE_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "max_position_embeddings", "head_dim",
)  # fmt: skip


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, refusing text that is not JSON, JSON that is not an object, a missing
    ``model_type`` and size fields that are not positive integers."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); re-download or re-save the checkpoint"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f'{path} has no "model_type" string: it is not a Hugging Face model config')
    for key in POSITIVE_INT_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: {key} is {value!r}, expected a positive integer")
    return config


def check_tokenizer_files(model_dir: Path) -> None:
    """Parse the tokenizer files that exist (``tokenizer.json`` fully, with ``tokenizers``), so a corrupt one is
    reported by name instead of failing inside transformers at load time."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            try:
                if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path} is corrupt ({exc}); re-download it or delete it") from None
    path = model_dir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            text = path.read_text(encoding="utf-8")
            doc = json.loads(text)
            if not isinstance(doc, dict) or "model" not in doc or "added_tokens" not in doc:
                raise ValueError("not a tokenizers file: no model or added_tokens")
            Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises plain Exception for a bad file
            msg = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{path} is corrupt ({msg}); re-download it") from None


class Checkpoint:
    """Name -> shard map of a checkpoint directory, validated at open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"model directory {self.path} does not exist (pass a local Hugging Face checkpoint)"
            )
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(
                f"{self.path} has no config.json: is this a Hugging Face checkpoint directory?"
            )
        self.config_dict: dict[str, Any] = read_config(cfg)
        check_tokenizer_files(self.path)
        self.shard_of: dict[str, str] = self._index()
        self._handles: dict[str, Any] = {}
        self._dtypes: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for shard in sorted(set(self.shard_of.values())):
            self._check_shard(shard)

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(
                    f"{index} is corrupt ({exc}); re-download or re-save the checkpoint"
                ) from None
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return dict.fromkeys(self._header(SINGLE), SINGLE)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{self.path} holds no *.safetensors weights (only safetensors checkpoints are supported; convert "
                "pytorch_model.bin with `save_pretrained(..., safe_serialization=True)`)"
            )
        return {name: shard for shard in shards for name in self._header(shard)}

    def _header(self, shard: str) -> dict[str, Any]:
        """Parse a shard's header, checking the file is as long as the header says (truncated downloads)."""
        path = self.path / shard
        if not path.is_file():
            raise CheckpointError(
                f"shard {shard} is listed in {INDEX} but missing from {self.path}; download the missing file"
            )
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"shard {path} is truncated (empty or cut off); download it again")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(
                    f"shard {path} is truncated or not a safetensors file; download it again"
                )
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError:
                raise CheckpointError(f"shard {path} has a corrupt header; download it again") from None
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise CheckpointError(
                f"shard {path} is truncated: {size} bytes on disk, {8 + n + end} expected; download it again"
            )
        return header

    def _check_shard(self, shard: str) -> None:
        for name, v in self._header(shard).items():
            self._dtypes[name] = v["dtype"]
            self._shapes[name] = v["shape"]

    # ------------------------------------------------------------------ reading
    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def nbytes(self, name: str) -> int:
        item = {
            "F64": 8,
            "F32": 4,
            "I64": 8,
            "I32": 4,
            "F16": 2,
            "BF16": 2,
            "I16": 2,
            "U8": 1,
            "I8": 1,
            "BOOL": 1,
        }
        n = 1
        for d in self._shapes[name]:
            n *= d
        return n * item.get(self._dtypes[name], 2)

    def _handle(self, shard: str) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
        return self._handles[shard]

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (CPU, checkpoint dtype)."""
        return self._handle(self.shard_of[name]).get_tensor(name)

    def slice0(self, name: str, index: int) -> torch.Tensor:
        """``tensor(name)[index]`` reading only that slice from disk."""
        return self._handle(self.shard_of[name]).get_slice(name)[index]
