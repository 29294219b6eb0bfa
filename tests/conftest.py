"""Shared fixtures: tiny random checkpoints of every family, built once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from hypothesis import settings

from tests.families import FAMILIES, build_checkpoint

# CI replays the same examples every run (a submission must not fail on a new random draw); locally the fuzz tests
# explore afresh each run, and what they find becomes a fixed test (e.g. tests/test_sampling.py's tiny temperature)
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: build_checkpoint(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def sharded_olmoe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OLMoE checkpoint split into several shards with an index."""
    return build_checkpoint("olmoe", tmp_path_factory.mktemp("sharded") / "olmoe", max_shard_size="100KB")
