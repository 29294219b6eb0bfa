"""``moeflow generate --gpus N``: N local processes of the same command; commands that run in one process refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeflow.cli import main
from tests.distributed.launch import ROOT


def test_gpus_beyond_the_host_is_one_line_error(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this host has the GPUs")
    code = main(["generate", "--model", str(checkpoints["olmoe"]), "--gpus", "2", "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("moeflow: error: --gpus 2 but this host has") and "--device cpu" in err


def test_serve_refuses_several_processes(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn")
    code = main(["serve", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--gpus", "2"])
    assert code == 2
    assert "moeflow serve runs in one process" in capsys.readouterr().err


@pytest.mark.slow
def test_gpus_on_cpu_starts_ranks_that_match_one_process(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(checkpoints["mixtral"]), "--device", "cpu", "--prompt", "def fib",
            "--prompt", "The capital", "--max-tokens", "8", "--cache-size", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    want = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "moeflow", *argv, "--gpus", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == want
