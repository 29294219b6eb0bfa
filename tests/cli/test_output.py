"""What the console script writes: JSON Lines with the reference tokens, the demo's check line, a plot refused
before any work without matplotlib, and a partial trace written atomically on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow.cli.demo import verdict
from tests.cli.helpers import one_error_line, run

SRC = str(Path(__file__).resolve().parents[2] / "src")
ROOT = str(Path(__file__).resolve().parents[2])


def reference(path: Path, prompt: str, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def test_generate_json_lines(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = checkpoints["qwen2_moe"]
    prompts = ["def fib(n):", "The capital of France"]
    argv = [
        "generate",
        "--model",
        str(path),
        "--device",
        "cpu",
        "--num-slots",
        "2",
        "--max-tokens",
        "4",
        "--json",
    ]
    code, out, _ = run([*argv, "--prompt", prompts[0], "--prompt", prompts[1]], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2  # one object per request, also for several prompts
    from moeflow import LLM

    per = LLM(path, device="cpu", num_slots=2, progress=False).info.expert_bytes
    for prompt, line in zip(prompts, lines):
        obj = json.loads(line)
        assert set(obj) >= {"prompt", "text", "token_ids", "finish_reason", "stats"}
        assert obj["prompt"] == prompt
        assert obj["token_ids"] == reference(path, prompt, 4)
        assert obj["finish_reason"] == ("eos" if obj["token_ids"][-1] == 0 else "length")
        s = obj["stats"]
        assert s["misses"] > 0 and s["hit_ratio"] == pytest.approx(s["hits"] / (s["hits"] + s["misses"]))
        assert s["bytes_to_device"] == s["misses"] * per
    code, out, _ = run([*argv, "--prompt", prompts[0]], capsys)
    assert code == 0 and len(out.splitlines()) == 1 and isinstance(json.loads(out), dict)


def test_demo_says_whether_tokens_equal_the_reference(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["demo", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--max-tokens", "6"], capsys
    )
    assert code == 0, err
    last = err.strip().splitlines()[-1]
    assert (
        last
        == "check: all 12 greedy tokens equal the un-offloaded transformers model's (CPU, same dtype and penalty)"
    )
    assert "demo: olmoe, 4 of 16 experts on the device" in err  # 25% by default
    assert verdict([[1, 2, 3]], [[1, 2, 4]]).endswith(
        "prompt 1 differs from the un-offloaded transformers model at token 3"
    )


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cli(args: list[str], **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{ROOT}"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def test_simulate_plot_without_matplotlib_fails_before_work(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from moeflow.cli import main\n"
        f"sys.exit(main(['simulate', '--trace', {str(tmp_path / 'missing.npz')!r}, '--cache-size', '4', "
        f"'--plot', {str(tmp_path / 'p.png')!r}]))"
    )
    proc = _cli(["-c", code])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--plot needs matplotlib" in one_error_line(err)  # before the trace is even opened
    assert not (tmp_path / "p.png").exists()


def test_sigint_during_trace_writes_a_partial_trace_atomically(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from moeflow.routing.trace import Trace

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i} says hello" for i in range(200)) + "\n")
    out = tmp_path / "t.npz"
    args = ["-m", "moeflow", "trace", "--model", str(checkpoints["olmoe"]), "--prompts", str(prompts),
            "--out", str(out), "--device", "cpu", "--max-tokens", "64", "--batch-size", "2"]  # fmt: skip
    proc = _cli(args)
    # model loaded and a few batches done, long before all 200 prompts: 10 s, and 8 s of the process's own CPU
    # time (a loaded machine stretches the wall time the load takes, not the CPU time)
    start = time.monotonic()
    while time.monotonic() - start < 10 or (_cpu_s(proc.pid) < 8 and time.monotonic() - start < 120):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; wrote the partial trace" in err and "Traceback" not in err
    trace = Trace.load(out)
    assert 0 < len(trace.requests()) < 200
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
