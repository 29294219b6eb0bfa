"""``moeflow quantize``: the checkpoint it writes loads as is, holds the same rows the engine would quantise at
load, generates the same tokens; an existing non-empty --out is refused unless --force; nothing half-written is left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from tests.cli.helpers import one_error_line, run

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_quantized_checkpoint_loads_and_generates(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str
) -> None:
    src, out = checkpoints[family], tmp_path / "q"
    code, stdout, _ = run(
        ["quantize", "--model", str(src), "--expert-dtype", "int4", "--out", str(out)], capsys
    )
    assert code == 0 and "wrote" in stdout
    assert json.loads((out / "config.json").read_text())["moeflow_quantization"]["expert_dtype"] == "int4"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the temporary directory was renamed into place
    assert (out / "tokenizer.json").is_file()
    loaded = LLM(out, device="cpu", num_slots=3, progress=False)
    at_load = LLM(src, device="cpu", num_slots=3, progress=False, expert_dtype="int4")
    assert loaded.store.codec is not None and loaded.store.codec.fmt.name == "int4"
    assert loaded.info.expert_bytes == at_load.info.expert_bytes
    row = torch.empty(loaded.info.expert_bytes, dtype=torch.uint8)
    loaded.loaded.read_expert(1, 3, row)
    assert torch.equal(row, at_load.store.host[at_load.store.host_row[(1, 3)]])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert loaded.generate(PROMPT, params)[0].token_ids == at_load.generate(PROMPT, params)[0].token_ids
    total = loaded.info.num_layers * loaded.info.num_experts
    assert (
        sum(f.stat().st_size for f in out.glob("experts-*.safetensors"))
        < total * at_load.info.expert_bytes * 1.1
    )


def test_refuses_a_non_empty_out_without_force(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["quantize", "--model", str(checkpoints["olmoe"]), "--expert-dtype", "int2", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "exists and is not empty" in one_error_line(err) and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run([*argv, "--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_refuses_an_already_quantized_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "a"
    assert run(["quantize", "--model", str(checkpoints["olmoe"]), "--expert-dtype", "int4", "--out", str(first)],
               capsys)[0] == 0  # fmt: skip
    code, _, err = run(["quantize", "--model", str(first), "--expert-dtype", "int2", "--out", str(tmp_path / "b")],
                       capsys)  # fmt: skip
    assert code == 2 and "already stores its experts as int4" in one_error_line(err)
    assert not (tmp_path / "b").exists()
