"""``moeflow perplexity``: the engine's NLL over sliding windows equals a direct transformers computation, the windows
score every token once, and ``--json`` prints nll, ppl and tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow import LLM
from moeflow.engine.perplexity import perplexity, windows
from tests.cli.helpers import run
from tests.families import TEXT


def direct_nll(path: Path, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Strided evaluation written out with transformers alone."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count, done = 0.0, 0, 0
    for start in range(0, len(ids), stride):
        end = min(start + context, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:end]])).logits[0]
        targets = torch.tensor(ids[start + 1 : end])
        losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
        new = losses[max(done - start, 0) :]  # positions start.. score tokens start+1..; skip those scored
        nll += float(new.double().sum())
        count += len(new)
        done = end - 1
        if end == len(ids):
            break
    return nll / count, count


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(10, 4, 2), (11, 4, 3), (9, 9, 9), (5, 8, 4), (7, 3, 1)]
)
def test_windows_score_every_token_once(n: int, context: int, stride: int) -> None:
    scored = []
    for start, end, first in windows(n, context, stride):
        assert end - start <= context and start <= first < end
        assert first - start + 1 >= min(
            context - stride, first + 1
        )  # tokens seen when scoring token first + 1
        scored += range(first, end - 1)
    assert scored == list(range(n - 1))


def test_matches_transformers_over_sliding_windows(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    ids = AutoTokenizer.from_pretrained(path)(" ".join(TEXT * 2))["input_ids"]
    assert len(ids) > 40
    want, count = direct_nll(path, ids, 24, 10)
    llm = LLM(path, device="cpu", num_slots=3, progress=False)
    got = perplexity(llm.loaded.model, ids, 24, 10, llm.device)
    assert got.tokens == count == len(ids) - 1
    assert got.nll == pytest.approx(want, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(want), rel=1e-5)


def test_cli_json_and_quantised_experts(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXT * 2), encoding="utf-8")
    base = ["perplexity", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--file", str(text),
            "--context", "24", "--cache-size", "3", "--json"]  # fmt: skip
    code, out, _ = run(base, capsys)
    full = json.loads(out)
    assert code == 0 and set(full) == {"nll", "ppl", "tokens"}
    assert full["ppl"] == pytest.approx(math.exp(full["nll"]))
    code, out, _ = run([*base, "--expert-dtype", "int2"], capsys)
    low = json.loads(out)
    assert code == 0 and low["tokens"] == full["tokens"] and low["nll"] != full["nll"]
    code, out, _ = run([*base[:-1]], capsys)
    assert code == 0 and out.startswith("nll ") and f"over {full['tokens']} tokens" in out
