"""The console script: info, and errors printed for users (generate --json: tests/cli/test_output.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.cli import main


def test_info_json(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["info", "--model", str(checkpoints["deepseek_v3"]), "--json", "--device-memory", "1GiB"]) == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == 2 and info["moe_layer_ids"] == [1, 2]
    assert info["experts_per_layer"] == 8 and info["top_k"] == 2
    assert info["expert_slots_fit"] == 16


def test_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("json_out", [False, True])
def test_generate_closes_the_engine_so_the_policy_saves(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], json_out: bool
) -> None:
    """``moeflow generate --policy moe-infinity`` closes its LLM: the collection it learned is saved."""
    out = tmp_path / "eamc.npz"
    args = ["generate", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--prompt", "def fib(n):",
            "--max-tokens", "3", "--policy", "moe-infinity", "--option", f"eamc_save={out}"]  # fmt: skip
    assert main(args + (["--json"] if json_out else [])) == 0
    capsys.readouterr()
    assert out.is_file()


def test_prefill_and_decode_flags_reach_the_engine(checkpoints: dict[str, Path]) -> None:
    """``--decode static --prefill slots`` builds a static decoder whose prompts go through the slot table; the
    flag defaults to auto."""
    import argparse

    from moeflow.cli import build_parser
    from moeflow.cli.run import engine_from_args

    flags = ["generate", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--prompt", "x"]
    args = build_parser().parse_args([*flags, "--decode", "static", "--prefill", "slots"])
    assert isinstance(args, argparse.Namespace)
    llm = engine_from_args(args)
    assert llm.static is not None and llm.config.prefill == "slots"
    assert build_parser().parse_args(flags).prefill == "auto"


def test_overlap_is_on_unless_no_overlap_is_given(checkpoints: dict[str, Path]) -> None:
    """The overlapped static decode is the default, offloaded steps included; ``--no-overlap`` builds an engine that
    settles each step, ``--no-overlap-offloaded`` one that settles each offloaded step."""
    from moeflow.cli import build_parser
    from moeflow.cli.run import engine_from_args

    flags = [
        "generate",
        "--model",
        str(checkpoints["olmoe"]),
        "--device",
        "cpu",
        "--prompt",
        "x",
        "--decode",
        "static",
    ]
    on = engine_from_args(build_parser().parse_args(flags))
    off = engine_from_args(build_parser().parse_args([*flags, "--no-overlap"]))
    assert on.config.overlap and on.overlap is not None
    assert not off.config.overlap and off.overlap is None
    assert on.config.overlap_offloaded and on.overlap.offloaded
    lagless = engine_from_args(build_parser().parse_args([*flags, "--no-overlap-offloaded"]))
    assert (
        not lagless.config.overlap_offloaded and lagless.overlap is not None and not lagless.overlap.offloaded
    )
