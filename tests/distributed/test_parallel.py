"""Expert-parallel runs over 2 gloo processes on the CPU: the same greedy tokens as one process (olmoe, mixtral,
partial caches, a traced placement), the torchrun CLI on the demo model, and a rank that dies or stalls."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeflow.cli import main
from moeflow.engine import LLM
from moeflow.sampling import SamplingParams
from tests.distributed.launch import ROOT, finish, free_port, start

PROMPTS = ["def fib(n):", "The capital of France"]


def one_process(model: Path, num_slots: int | None, max_tokens: int) -> tuple[list[list[int]], int]:
    llm = LLM(model, device="cpu", num_slots=num_slots, progress=False, decode="eager", batch_size=2)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens))
    llm.close()
    return [o.token_ids for o in outs], outs[0].stats.hits + outs[0].stats.misses


def test_two_ranks_generate_as_one(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    recorder = LLM(checkpoints["olmoe"], device="cpu", progress=False, decode="eager", record_trace=True)
    recorder.generate(["import os\nimport sys"], SamplingParams(max_tokens=6))
    recorder.trace().save(tmp_path / "trace.npz")
    cases = [
        dict(model=str(checkpoints["olmoe"]), num_slots=None),  # every homed expert cached
        dict(model=str(checkpoints["olmoe"]), num_slots=3),  # 3 slots per rank for 8 homed experts
        dict(model=str(checkpoints["mixtral"]), num_slots=3),
        dict(model=str(checkpoints["olmoe"]), num_slots=4, policy="lfu", placement_trace=str(tmp_path / "trace.npz")),
    ]  # fmt: skip
    for case in cases:
        case.update(prompts=PROMPTS, max_tokens=8, batch_size=2)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    runs = finish(start(["generate", str(tmp_path / "cases.json"), str(tmp_path / "out.json")]))
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
    results = json.loads((tmp_path / "out.json").read_text())
    for case, got in zip(cases, results):
        want, requests = one_process(Path(case["model"]), case["num_slots"], 8)
        assert got["token_ids"] == want, case
        # each (layer, distinct expert) of a step is asked for once, on its home rank: the ranks' sum is one run's
        assert got["hits"] + got["misses"] == requests, case
        assert got["homed"] == 8  # 2 layers x 8 experts, half on each rank
        assert got["slots"] == (case["num_slots"] or 8)


def test_torchrun_cli_matches_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(ROOT / "models/demo"), "--device", "cpu", "--prompt", "Once upon a time",
            "--max-tokens", "6", "--cache-size", "0.25", "--json"]  # fmt: skip
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)["token_ids"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "moeflow", *argv]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # rank 0 prints, rank 1 does not
    assert json.loads(lines[0])["token_ids"] == want


@pytest.mark.parametrize("how", ["kill", pytest.param("stall", marks=pytest.mark.slow)])
def test_a_dead_rank_stops_the_others_with_one_line(checkpoints: dict[str, Path], how: str) -> None:
    timeout = 8.0
    argv = ["cli", "generate", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--prompt", "def fib",
            "--max-tokens", "40", "--json", "--decode", "eager", "--policy", "die-at-step", "--option",
            "die_rank=1", "--option", "die_step=3", "--option", f"die={how}"]  # fmt: skip
    procs = start(argv, timeout_s=timeout)
    t0 = time.monotonic()
    code, out, err = finish(procs[:1], timeout_s=90)[0]
    waited = time.monotonic() - t0
    procs[1].kill()
    finish(procs[1:])
    assert code == 2, err[-2000:]
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("moeflow: error: rank 0: all_reduce with the other 1 rank(s) failed"), err[-2000:]
    if how == "stall":  # no reply: the collective's timeout ends the wait
        assert waited >= timeout
