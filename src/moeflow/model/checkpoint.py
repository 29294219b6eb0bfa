"""A Hugging Face checkpoint directory on disk: its config, its safetensors shards, validation.

Tensors are read with ``pread`` at the offsets the shard headers give, into fresh buffers, through file descriptors
kept open for the engine's life; one expert's slice of a fused 3-D tensor is one read, so a whole layer's experts are
never materialised. Reading (rather than memory-mapping) keeps the page cache out of the process's RSS: a mapped
checkpoint's touched pages count as resident, so the memory budgets could not bound the process on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeflow.errors import CheckpointError

INDEX = "model.safetensors.index.json"
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
}  # fmt: skip
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
        self._data_start: dict[str, int] = {}  # shard -> byte offset of its data (after the header)
        self._begin: dict[str, int] = {}  # tensor -> byte offset inside its shard's data
        self._fds: dict[str, int] = {}
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
            self._data_start[shard] = 8 + n
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
            self._begin[name] = v["data_offsets"][0]

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
            "F8_E4M3": 1,
        }
        n = 1
        for d in self._shapes[name]:
            n *= d
        return n * item.get(self._dtypes[name], 2)

    def _handle(self, shard: str) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
        return self._handles[shard]

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype ``name`` is stored in (None: one torch has no equivalent of)."""
        return TORCH_DTYPES.get(self._dtypes[name])

    def _read(
        self, name: str, first: int, count: int, shape: list[int], into: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Elements [first, first + count) of ``name`` read from disk into ``into`` (contiguous, of the stored
        dtype) or a new tensor of ``shape``; None for a dtype without a torch equivalent (the caller falls back to
        safetensors)."""
        dtype = TORCH_DTYPES.get(self._dtypes[name])
        if dtype is None:
            return None
        shard = self.shard_of[name]
        if shard not in self._fds:
            self._fds[shard] = os.open(self.path / shard, os.O_RDONLY)
        if into is not None and (into.dtype != dtype or into.numel() != count or not into.is_contiguous()):
            raise ValueError(
                f"cannot read {count} {dtype} elements of {name} into {into.dtype}{list(into.shape)}"
            )
        out = (
            torch.empty(count * dtype.itemsize, dtype=torch.uint8) if into is None else into.view(torch.uint8)
        )
        view, done = memoryview(out.numpy()).cast("B"), 0
        offset = self._data_start[shard] + self._begin[name] + first * dtype.itemsize
        while done < len(view):
            n = os.preadv(self._fds[shard], [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"shard {self.path / shard} ended early while reading {name}; download it again"
                )
            done += n
        return into if into is not None else out.view(dtype).reshape(shape)

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None) -> None:
        """Read ``tensor(name)`` (or ``slice0(name, index)``) from disk straight into ``out``: contiguous, of the
        stored dtype and element count (a read with no buffer between)."""
        shape = self._shapes[name]
        row = math.prod(shape[1:]) if index is not None else math.prod(shape)
        if index is not None and not 0 <= index < shape[0]:
            raise IndexError(f"{name} has {shape[0]} rows, asked for row {index}")
        if self._read(name, (index or 0) * row, row, [row], out) is None:
            raise ValueError(f"{name} is stored as {self._dtypes[name]}, which torch cannot read into")

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (CPU, checkpoint dtype)."""
        shape = self._shapes[name]
        value = self._read(name, 0, math.prod(shape), shape)
        return value if value is not None else self._handle(self.shard_of[name]).get_tensor(name)

    def slice0(self, name: str, index: int) -> torch.Tensor:
        """``tensor(name)[index]`` reading only that slice from disk."""
        shape = self._shapes[name]
        if not 0 <= index < shape[0]:
            raise IndexError(f"{name} has {shape[0]} rows, asked for row {index}")
        row = math.prod(shape[1:])
        value = self._read(name, index * row, row, shape[1:])
        return value if value is not None else self._handle(self.shard_of[name]).get_slice(name)[index]

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
