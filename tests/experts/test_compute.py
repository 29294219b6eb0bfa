"""Expert compute over the slot pool: grouped_mm split into windows of slots (a pool wider than one grouped_mm
call takes) gives the same tokens and logits as the per-expert loop; "auto" never gathers more than GATHER_BYTES."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.experts import compute
from tests.test_engine import PROMPT


@pytest.mark.parametrize("window", [1000, 3, 1])
def test_grouped_windows_equal_the_loop(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    path = checkpoints["qwen3_moe"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = torch.tensor(PROMPT)
    loop = LLM(path, device="cpu", num_slots=None, expert_backend="loop", decode="eager", progress=False)
    want = loop.generate(PROMPT, params)[0].token_ids
    with torch.no_grad():
        want_logits = loop.loaded.model(ids).logits
    monkeypatch.setattr(compute, "GROUPED_MAX_SLOTS", window)
    llm = LLM(path, device="cpu", num_slots=None, expert_backend="grouped", decode="eager", progress=False)
    assert llm.generate(PROMPT, params)[0].token_ids == want
    with torch.no_grad():
        torch.testing.assert_close(llm.loaded.model(ids).logits, want_logits, rtol=1e-4, atol=1e-5)


def test_auto_gathers_within_its_bound() -> None:
    per = 12 * 2**20
    assert compute.auto_backend(8, per, cuda=True) == "batched"  # 96 MiB of copies
    assert compute.auto_backend(16, per, cuda=True) == "grouped"  # 192 MiB would exceed GATHER_BYTES
    assert compute.auto_backend(2, 336 * 2**20, cuda=True) == "grouped"  # Mixtral-sized experts: never copied
    assert (
        compute.auto_backend(4096, 1024, cuda=False) == "grouped"
    )  # a CPU prefill: one grouped call, no copies
    assert compute.auto_backend(8, 2**20, cuda=False) == "batched"  # small experts gather on a CPU too
    assert compute.auto_backend(8, per, cuda=False) == "loop"  # 96 MiB would be RSS beyond the budget
