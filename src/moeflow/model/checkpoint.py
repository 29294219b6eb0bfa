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
        self.config_dict: dict[str, Any] = json.loads(cfg.read_text())
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
