"""The sampler: the repetition penalty follows transformers' rule (scores, choices, whole greedy runs); tiny temperatures
sample the argmax without NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from moeflow import LLM, SamplingParams
from moeflow.errors import RequestError
from moeflow.sampling import penalise

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]


def test_penalty_equals_transformers_processor() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    history = [[1, 2, 2, 7], [4], [9, 30, 49, 0, 1]]
    width = max(map(len, history))
    ids = torch.tensor([h + h[:1] * (width - len(h)) for h in history])
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(penalise(logits, history, 1.7), want)


def test_greedy_with_penalty_equals_transformers(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=40, do_sample=False, repetition_penalty=10.0,
                       eos_token_id=None, pad_token_id=0)  # fmt: skip
    want = out[0, len(PROMPT) :].tolist()
    llm = LLM(path, device="cpu", num_slots=4, progress=False)
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=40, ignore_eos=True))[0].token_ids
    got = llm.generate([PROMPT], SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=10.0))[0]
    assert got.token_ids == want and got.token_ids != plain


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_penalty_must_be_positive(bad: float) -> None:
    with pytest.raises(RequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=bad)


def test_tiny_temperature_samples_the_argmax_without_nan() -> None:
    """Found by the CLI fuzz test: a temperature like 6e-199 overflowed the scaled scores to inf (softmax: NaN)."""
    from moeflow.sampling import sample

    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, -1.0, 0.25]])
    for temperature in (6.4e-199, 1e-30):
        got = sample(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))
        assert got.tolist() == [1, 0]
