"""The sampler: the repetition penalty follows transformers' rule (scores, choices, whole greedy runs); tiny temperatures
sample the argmax without NaN; a batched draw keeps each row's own settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from moeflow import LLM, SamplingParams
from moeflow.errors import RequestError
from moeflow.sampling import filtered, penalise, sample, sample_rows

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


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's sampling distribution written out plainly: softmax at the temperature over the top-k, then the
    smallest head of those whose renormalised probability reaches top-p."""
    probs = (logits.double() / p.temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    head = order[: p.top_k] if p.top_k else order
    mass = sum(float(probs[t]) for t in head)  # top-p counts in the top-k's renormalised distribution
    keep = torch.zeros_like(probs, dtype=torch.bool)
    total = 0.0
    for t in head:
        if total >= p.top_p:
            break
        keep[t], total = True, total + float(probs[t]) / mass
    kept = probs * keep
    return kept / kept.sum()


def test_a_batched_draw_gives_each_row_its_own_distribution() -> None:
    """Rows of one batch with different settings (and a row whose draw means nothing, left at its defaults): each
    drawn row's token frequencies over many draws match its own distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 4)
    params = {0: SamplingParams(temperature=0.7), 1: SamplingParams(temperature=1.5, top_k=2),
              3: SamplingParams(temperature=1.0, top_p=0.6)}  # fmt: skip
    torch.manual_seed(0)
    draws = torch.stack([sample_rows(logits, list(params), list(params.values())) for _ in range(6000)])
    for row, p in params.items():
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        torch.testing.assert_close(freq, reference_probs(logits[row], p), atol=0.025, rtol=0)


def test_the_batched_filter_equals_the_per_request_sampler_row_by_row() -> None:
    """``sample_rows`` and ``sample`` draw from the same filtered scores: top-k 1, or a top-p below the top
    token's probability, leave only the argmax either way."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g)
    sharp = [SamplingParams(temperature=0.9, top_k=1), SamplingParams(temperature=2.0, top_p=1e-4)]
    rows = [1, 4]
    got = sample_rows(logits, rows, sharp)
    for r, p in zip(rows, sharp):
        assert int(got[r]) == int(logits[r].argmax())
        assert int(sample(logits[r : r + 1], p, torch.Generator().manual_seed(0))[0]) == int(
            logits[r].argmax()
        )
    mixed = [SamplingParams(temperature=0.8, top_k=5, top_p=0.7), SamplingParams(temperature=1.2)]
    both = filtered(
        logits[rows], [p.temperature for p in mixed], [p.top_k for p in mixed], [p.top_p for p in mixed]
    )
    for i, p in enumerate(mixed):
        alone = filtered(logits[rows[i] : rows[i] + 1], [p.temperature], [p.top_k], [p.top_p])
        assert torch.equal(both[i : i + 1], alone)
        assert torch.equal(torch.isfinite(alone[0]), reference_probs(logits[rows[i]], p) > 0)
