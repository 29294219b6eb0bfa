"""``moeflow quantize``: write a checkpoint whose experts are stored as quantised rows, which moeflow loads as is.

Dense tensors are copied as the source stores them (same names and dtypes); each MoE layer's experts become one
uint8 tensor ``<experts module path>.moeflow_rows`` [E, row bytes] (:class:`~moeflow.quant.row.RowCodec` layout,
fitted from the checkpoint's own precision); ``config.json`` gains ``moeflow_quantization`` naming the format. The
directory is written under a temporary name beside ``out`` and renamed into place at the end, so an interrupted run
leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moeflow.errors import CheckpointError, MoeflowError
from moeflow.model.checkpoint import INDEX, Checkpoint
from moeflow.model.loader import LoadedModel, open_model
from moeflow.model.rows import read_rows
from moeflow.model.stored import CONFIG_KEY, ROWS_SUFFIX

DENSE_SHARD_BYTES = 2 * 2**30
"""Dense tensors are written in shards of about this size."""


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace a non-empty ``out`` unless ``force``."""
    if out.exists() and not out.is_dir():
        raise MoeflowError(f"--out {out} is a file, not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MoeflowError(f"--out {out} exists and is not empty: choose another directory or pass --force")


def quantise_checkpoint(model_dir: str, out: str | os.PathLike, expert_dtype: str, force: bool = False,
                        progress: bool = True) -> Path:  # fmt: skip
    """Write ``model_dir`` with experts as ``expert_dtype`` rows to ``out``; returns ``out``."""
    target = Path(out)
    check_out(target, force)
    lm = open_model(model_dir, torch.device("cpu"), "float32", expert_dtype)
    if lm.stored is not None:
        raise CheckpointError(f"{model_dir} already stores its experts as {lm.stored.fmt.name}: quantize a "
                              "full-precision checkpoint")  # fmt: skip
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = _write_experts(lm, tmp, progress)
        weight_map.update(_write_dense(lm, tmp, set(weight_map) | _expert_keys(lm)))
        _write_meta(lm, Path(model_dir), tmp, weight_map, expert_dtype)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _expert_keys(lm: LoadedModel) -> set[str]:
    keys: set[str] = set()
    for layer in lm.layers:
        for p in lm.layout.params:
            for part in lm.weights.sources[f"{layer.path}.{p.name}"].parts.values():
                keys.update(part)
    return keys


def _write_experts(lm: LoadedModel, tmp: Path, progress: bool) -> dict[str, str]:
    codec = lm.codecs.host
    assert codec is not None
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(lm.layers) * lm.num_experts, desc=f"experts -> {codec.fmt.name}", unit="expert",
               disable=not progress)  # fmt: skip
    for layer in lm.layers:
        rows = torch.zeros(lm.num_experts, codec.nbytes, dtype=torch.uint8)
        read_rows(lm, layer.index, list(range(lm.num_experts)), rows, codec)
        bar.update(lm.num_experts)
        key, shard = f"{layer.path}.{ROWS_SUFFIX}", f"experts-{layer.index:05d}.safetensors"
        save_file({key: rows}, str(tmp / shard), metadata={"format": "pt"})
        weight_map[key] = shard
    bar.close()
    return weight_map


def _write_dense(lm: LoadedModel, tmp: Path, skip: set[str]) -> dict[str, str]:
    ckpt: Checkpoint = lm.checkpoint
    weight_map: dict[str, str] = {}
    batch: dict[str, torch.Tensor] = {}
    size, count = 0, 0

    def flush() -> None:
        nonlocal batch, size, count
        if batch:
            shard = f"dense-{count:05d}.safetensors"
            save_file(batch, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(batch, shard))
            batch, size, count = {}, 0, count + 1

    for key in sorted(ckpt.shard_of):
        if key in skip:
            continue
        batch[key] = ckpt.tensor(key).contiguous()
        size += ckpt.nbytes(key)
        if size >= DENSE_SHARD_BYTES:
            flush()
    flush()
    return weight_map


def _write_meta(lm: LoadedModel, src: Path, tmp: Path, weight_map: dict[str, str], expert_dtype: str) -> None:
    for item in src.iterdir():  # tokenizer, generation config, moeflow/ (what policies learned), README...
        if item.name == INDEX or item.suffix == ".safetensors" or item.name == "config.json":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    config = dict(lm.checkpoint.config_dict)
    assert lm.codecs.host is not None
    config[CONFIG_KEY] = {
        "expert_dtype": expert_dtype,
        "row_bytes": lm.codecs.host.nbytes,
        "format_version": 1,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    total = sum((tmp / s).stat().st_size for s in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
