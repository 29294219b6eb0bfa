"""Bad checkpoints and budgets give one clear error naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeflow import LLM
from moeflow.errors import BudgetError, CheckpointError, UnsupportedModelError
from moeflow.model.checkpoint import Checkpoint


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)


def test_missing_shard_is_named(sharded_olmoe: Path, tmp_path: Path) -> None:
    ckpt = copy(sharded_olmoe, tmp_path / "m")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim} .*missing"):
        Checkpoint(ckpt)


def test_truncated_shard(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy(checkpoints["mixtral"], tmp_path / "m")
    shard = ckpt / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(ckpt)


def test_no_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy(checkpoints["mixtral"], tmp_path / "m")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(ckpt)


def test_unsupported_architecture(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy(checkpoints["mixtral"], tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported"):
        LLM(ckpt, device="cpu", progress=False)


def test_config_that_does_not_match_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy(checkpoints["olmoe"], tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_experts"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config does not match"):
        LLM(ckpt, device="cpu", progress=False)
    cfg["num_experts"], cfg["hidden_size"] = 8, 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        LLM(ckpt, device="cpu", progress=False)


def test_budget_too_small_names_the_minimum(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(BudgetError, match="raise --device-memory to at least"):
        LLM(checkpoints["olmoe"], device="cpu", device_memory="10KB", progress=False)


def test_moe_family_outside_the_experts_interface_is_refused_with_the_reason(tmp_path: Path) -> None:
    """JetMoe's experts use their own layout (not transformers' experts interface): refused, naming why."""
    from tests.families import save_random, tiny_config

    path = save_random(tiny_config("jetmoe"), tmp_path / "jetmoe")
    with pytest.raises(UnsupportedModelError, match="'jetmoe' is not supported: its experts .* own layout"):
        LLM(path, device="cpu", progress=False)
