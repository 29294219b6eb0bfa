"""Every bad input a user can give the console script ends in one line naming the problem, exit code 2 (or a
warning and a normal run), never a traceback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moeflow import __version__
from tests.cli.helpers import copy_checkpoint, one_error_line, run

GEN = ["generate", "--device", "cpu", "--prompt", "def fib(n):", "--max-tokens", "2"]


@pytest.fixture()
def olmoe(checkpoints: dict[str, Path]) -> str:
    return str(checkpoints["olmoe"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model_type": "olmoe", ', "config.json is not valid JSON"),
        ('["olmoe"]', "holds a JSON list, not an object"),
        ('{"num_experts": 8}', 'has no "model_type" string'),
        (
            '{"model_type": "olmoe", "num_experts": "eight"}',
            "num_experts is 'eight', expected a positive integer",
        ),
    ],
)
def test_bad_config_json(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    model = copy_checkpoint(checkpoints["olmoe"], tmp_path / "m")
    (model / "config.json").write_text(content)
    code, out, err = run([*GEN, "--model", str(model)], capsys)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


@pytest.mark.parametrize("content", ['{"version": "1.0", "trunc', '{"version": "1.0"}', "\x00\x01garbage"])
def test_corrupt_tokenizer_json(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    model = copy_checkpoint(checkpoints["olmoe"], tmp_path / "m")
    (model / "tokenizer.json").write_text(content)
    code, _, err = run([*GEN, "--model", str(model)], capsys)
    assert code == 2
    assert "tokenizer.json is corrupt" in one_error_line(err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--option", "foo"], "--option 'foo': write it as key=value"),
        (["--option", "=1"], "write it as key=value"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size: expected an integer"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["--temperature", "-1"], "argument --temperature: must be at least 0"),
        (["--top-p", "0"], "argument --top-p: must be above 0"),
        (["--top-p", "1.5"], "argument --top-p: must be at most 1"),
        (["--max-tokens", "0"], "argument --max-tokens: must be at least 1"),
        (["--device-memory", "lots"], "argument --device-memory: cannot parse memory size 'lots'"),
        (["--expert-backend", "cuda-magic"], "argument --expert-backend: invalid choice"),
        (["--expert-backend", "triton", "--device", "cpu"], "the triton expert backend runs on CUDA only"),
    ],
)
def test_bad_flags(olmoe: str, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    code, out, err = run([*GEN, "--model", olmoe, *flags], capsys)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed here")
def test_triton_backend_without_triton(olmoe: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*GEN, "--model", olmoe, "--device", "auto", "--expert-backend", "triton"]
    code, _, err = run(argv, capsys)
    assert code == 2
    line = one_error_line(err)
    assert "needs Triton" in line or "CUDA only" in line


def test_empty_prompt(olmoe: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["generate", "--model", olmoe, "--device", "cpu", "--prompt", ""], capsys)
    assert code == 2 and "empty prompt" in one_error_line(err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-slots", "0"], "argument --num-slots: cache size 0: at least one slot is needed"),
        (["--num-slots", "1"], "--num-slots 1 gives 1 slot, fewer than one token's 2 routed experts"),
        (["--cache-size", "1"], "--cache-size 1 gives 1 slot"),
        (["--cache-size", "17"], "--cache-size 17: there are only 16 experts in all"),
        (["--cache-size", "1.5"], "a share must be above 0 and at most 1"),
        (["--cache-size", "-1"], "cannot read cache size '-1'"),
        (["--cache-size", "0%"], "a share must be above 0"),
    ],
)
def test_cache_sizes_are_checked_and_errors_name_the_flag_given(
    olmoe: str, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, _, err = run([*GEN, "--model", olmoe, *flags], capsys)
    line = one_error_line(err)
    assert code == 2 and message in line
    assert "--device-memory" not in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--cache-fraction", "2"), ("--cache-fraction", "-1"), ("--cache-size", "2.0")]
)
def test_demo_refuses_nonsense_cache_shares(
    olmoe: str, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    code, out, err = run(["demo", "--model", olmoe, "--device", "cpu", flag, value, "--no-check"], capsys)
    assert code == 2 and out == ""
    assert flag in one_error_line(err) or "cache size" in one_error_line(err)


def test_budgets_beyond_the_machine_warn_with_its_size(
    olmoe: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from moeflow.config import format_size
    from moeflow.memory import total_ram

    code, out, err = run(
        [*GEN, "--model", olmoe, "--host-memory", "100TiB", "--device-memory", "100TiB"], capsys
    )
    assert code == 0 and out.startswith("def fib(n):")
    warning = [line for line in err.splitlines() if line.startswith("moeflow: warning:")]
    assert len(warning) == 1
    assert f"more than this machine's {format_size(total_ram())} of RAM" in warning[0]
    assert "100.00 TiB" in warning[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"moeflow {__version__}"


def test_unknown_subcommand_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice: 'frobnicate'" in one_error_line(err)


def test_every_flag_has_help_and_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from moeflow.cli import build_parser

    def walk(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return [parser] + [p for s in subs for child in s.choices.values() for p in walk(child)]

    for parser in walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"
        if parser.prog == "moeflow generate":
            text = parser.format_help()
            assert "(default: 8)" in text and "(default: lru)" in text


def test_unexpected_errors_are_one_line_unless_debugging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "t.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    code, _, err = run(["trace-stats", str(bad)], capsys)
    assert code == 2 and "is not a readable moeflow trace" in one_error_line(err)
    monkeypatch.setenv("MOEFLOW_DEBUG", "1")
    from moeflow.errors import TraceError

    with pytest.raises(TraceError):
        run(["trace-stats", str(bad)], capsys)


def test_simulate_checks(olmoe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeflow import LLM, SamplingParams

    llm = LLM(olmoe, device="cpu", record_trace=True, progress=False)
    llm.generate([[5, 17, 42], [7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))
    trace = tmp_path / "t.npz"
    llm.trace().save(trace)
    out_json = tmp_path / "res.json"
    base = ["simulate", "--trace", str(trace), "--policy", "lru", "--out", str(out_json)]
    code, _, err = run([*base, "--cache-size", "4", "--bandwidth", "0"], capsys)
    assert code == 2 and "argument --bandwidth: must be above 0" in one_error_line(err)
    code, _, err = run([*base, "--cache-size", "2.5"], capsys)
    assert code == 2 and "a share must be above 0 and at most 1" in one_error_line(err)
    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    if demo.is_dir():
        code, _, err = run([*base, "--cache-size", "4", "--model-dir", str(demo)], capsys)
        line = one_error_line(err)
        assert code == 2 and "has 16 MoE layers x 64 experts, top-8, but the trace has 2 x 8, top-2" in line
    assert not out_json.exists()  # nothing half-written by a refused run
    # one syntax: 0.25, 25% and 4 are the same 4 slots of 16
    code, out, _ = run([*base, "--cache-size", "0.25", "25%", "4", "--json"], capsys)
    assert code == 0
    assert [r["cache_slots"] for r in json.loads(out)["results"]] == [4, 4, 4]
    assert json.loads(out_json.read_text())["results"][0]["cache_slots"] == 4
