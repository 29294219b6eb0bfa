"""Continuous batching (``BatchEngine``): outputs equal each prompt run alone whatever runs beside it, finished and
aborted sequences leave the batch at once, a long prompt's chunked prefill does not stall the decoding streams.
Every test runs on both decode paths: the static one (rows of a static bucket, the step a GPU captures, run eagerly
here) and the eager row pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.batch import BatchEngine, StepOutput

PROMPTS = [
    "The quick brown fox",
    "import os\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1)",
    "The capital of",
    "print(",
    "hello world hello world",
]


def greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def drain(
    engine: BatchEngine, on_step=None, seen: dict[int, list[StepOutput]] | None = None, steps: int = -1
) -> dict[int, list[StepOutput]]:
    """Step until idle (or ``steps`` times); every request's outputs in order, added to ``seen``."""
    seen = {} if seen is None else seen
    while engine.has_work and steps != 0:
        steps -= 1
        before = {rid for rid, e in engine.running.items()}
        outs = engine.step()
        for o in outs:
            seen.setdefault(o.request_id, []).append(o)
        if on_step is not None:
            on_step(before, outs)
    return seen


DECODES = ["static", "eager"]


@pytest.fixture(scope="module", params=DECODES)
def llm(request: pytest.FixtureRequest, checkpoints: dict[str, Path]):
    with LLM(
        checkpoints["olmoe"], device="cpu", progress=False, batch_size=4, decode=request.param
    ) as engine:
        assert (engine.static is not None) == (request.param == "static")
        yield engine


@pytest.fixture(scope="module", params=[(f, d) for f in ("olmoe", "mixtral", "gpt_oss") for d in DECODES],
                ids=lambda p: "-".join(p))  # fmt: skip
def family_llm(request: pytest.FixtureRequest, checkpoints: dict[str, Path]):
    """One mask for all layers (OLMoE), a sliding window (Mixtral), per-layer-type masks and sinks (gpt-oss)."""
    family, decode = request.param
    with LLM(checkpoints[family], device="cpu", progress=False, batch_size=4, decode=decode) as engine:
        yield engine


@pytest.mark.parametrize(("max_batch", "chunk"), [(3, 1000), (3, 5), (6, 2)])
def test_outputs_equal_prompts_run_alone(family_llm: LLM, max_batch: int, chunk: int) -> None:
    llm = family_llm
    want = [llm.generate([p], greedy())[0] for p in PROMPTS]
    engine = BatchEngine(llm, max_batch=max_batch, prefill_chunk=chunk)
    ids = [engine.add(p, greedy()) for p in PROMPTS[:3]]
    seen = drain(engine, steps=2)
    ids += [engine.add(p, greedy()) for p in PROMPTS[3:]]  # join a batch that is already decoding
    drain(engine, seen=seen)
    for rid, out in zip(ids, want):
        last = seen[rid][-1]
        assert last.finished and last.output is not None
        assert last.output.token_ids == out.token_ids
        assert last.output.text == out.text == "".join(o.text for o in seen[rid])
    assert engine.kv.free == max_batch


def test_finished_sequences_leave_the_batch_at_once(llm: LLM) -> None:
    engine = BatchEngine(llm, max_batch=4, prefill_chunk=64)
    lengths = {engine.add(p, greedy(n)): n for p, n in zip(PROMPTS, (2, 9, 4, 6))}
    finished: set[int] = set()

    def check(running_before: set[int], outs: list[StepOutput]) -> None:
        got = {o.request_id for o in outs}
        assert not got & finished, "a finished sequence produced a token"
        assert got == running_before  # every running sequence, and only those, got its token
        finished.update(o.request_id for o in outs if o.finished)
        assert engine.kv.free == 4 - len(engine.running)

    engine.step()  # the prefill: everyone's first token
    seen = drain(engine, check)
    assert {rid: len(v) + 1 for rid, v in seen.items()} == lengths


def test_abort_frees_the_row_at_once(llm: LLM) -> None:
    engine = BatchEngine(llm, max_batch=2, prefill_chunk=64)
    keep = engine.add(PROMPTS[0], greedy(8))
    gone = engine.add(PROMPTS[1], greedy(50))
    waiting = engine.add(PROMPTS[2], greedy(8))
    engine.step()
    engine.step()
    assert set(engine.running) == {keep, gone} and engine.kv.free == 0
    assert engine.abort(gone)
    assert gone not in engine.running and engine.kv.free == 1
    assert not engine.abort(gone)
    outs = engine.step()  # the waiting request takes the freed row in this very step
    assert waiting in engine.running and gone not in {o.request_id for o in outs}
    seen = drain(engine)
    assert seen[waiting][-1].output.token_ids == llm.generate([PROMPTS[2]], greedy(8))[0].token_ids
    assert seen[keep][-1].output.token_ids == llm.generate([PROMPTS[0]], greedy(8))[0].token_ids
    assert gone not in seen


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(llm: LLM) -> None:
    engine = BatchEngine(llm, max_batch=2, prefill_chunk=8)
    short = engine.add(PROMPTS[1], greedy(30))
    engine.step()
    long_ids = llm.tokenizer(" ".join(PROMPTS))["input_ids"][:60]
    long = engine.add(long_ids, greedy(3))
    steps_to_first = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps_to_first += 1
        assert short in outs  # the decoding stream got its token in every step
        if long in outs:
            break
    assert steps_to_first == -(-len(long_ids) // 8)  # at most 8 prompt tokens per step
    seen = drain(engine)
    assert seen[long][-1].output.token_ids == llm.generate([long_ids], greedy(3))[0].token_ids
    clock, prompts = engine.clock, len(llm.tokenizer(PROMPTS[1])["input_ids"]) + len(long_ids)
    assert clock.prefill_tokens == prompts  # every prompt token ran in a prefill forward once
    assert clock.count["prefill"] == 1 + steps_to_first  # the short prompt's forward, then one chunk a step
    # one decode forward a token after the short stream's first, which came from its prefill (the long one's fall
    # in the same forwards)
    assert clock.count["decode"] == len(seen[short][-1].output.token_ids) - 1
    assert all(t > 0 for t in clock.seconds.values())


def test_seeded_sampling_does_not_depend_on_batch_mates(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.3, top_k=20, seed=11, ignore_eos=True)
    want = llm.generate([PROMPTS[0]], params)[0].token_ids
    engine = BatchEngine(llm, max_batch=4, prefill_chunk=4)
    rid = engine.add(PROMPTS[0], params)
    for p in PROMPTS[1:4]:
        engine.add(p, SamplingParams(max_tokens=8, temperature=0.7, ignore_eos=True))
    assert drain(engine)[rid][-1].output.token_ids == want


def test_unseeded_sampled_rows_keep_their_own_settings_in_the_batched_draw(llm: LLM) -> None:
    """Unseeded sampled rows are drawn together on the device, each by its own settings: with top-k 1 (or a
    top-p below the top token's probability) a sampled row must give its greedy tokens, beside rows that draw
    freely, a greedy row and a seeded one."""
    engine = BatchEngine(llm, max_batch=4, prefill_chunk=64)
    sharp = {engine.add(PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True)): 0,
             engine.add(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, top_p=1e-6, ignore_eos=True)): 1}  # fmt: skip
    free = engine.add(PROMPTS[2], SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
    seeded = SamplingParams(max_tokens=8, temperature=1.3, top_k=20, seed=5, ignore_eos=True)
    engine.add(PROMPTS[3], seeded)
    seen = drain(engine)
    for rid, i in sharp.items():
        assert seen[rid][-1].output.token_ids == llm.generate([PROMPTS[i]], greedy(8))[0].token_ids
    vocab = llm.loaded.config.vocab_size
    assert len(seen[free][-1].output.token_ids) == 8 and all(
        0 <= t < vocab for t in seen[free][-1].output.token_ids
    )


def test_bad_request_is_refused_on_add(llm: LLM) -> None:
    from moeflow.errors import RequestError

    engine = BatchEngine(llm, max_batch=2)
    limit = llm.loaded.config.max_position_embeddings
    with pytest.raises(RequestError, match=str(limit)):
        engine.add([5] * (limit + 1), greedy(4))
    assert not engine.has_work


def test_expert_aware_admission_prefers_shared_experts_within_the_wait_bound(llm: LLM) -> None:
    import numpy as np

    from moeflow.engine.admission import Admission

    def cluster(c: int) -> np.ndarray:
        p = np.zeros((2, 8))
        p[:, 2 * c : 2 * c + 2] = 1.0
        return p

    paths = {PROMPTS[0]: cluster(0), PROMPTS[1]: cluster(3), PROMPTS[2]: cluster(0), PROMPTS[3]: cluster(0)}

    def run(max_wait: int) -> list[str]:
        """Prompts in the order they got their first token (= were admitted: each prefill fits one step)."""
        admission = Admission(max_wait, lambda seq: paths[seq.prompt])
        engine = BatchEngine(llm, max_batch=2, prefill_chunk=64, admission=admission)
        names = {engine.add(p, greedy(n)): p for p, n in zip(PROMPTS[:4], (12, 3, 3, 3))}
        order: list[int] = []
        while engine.has_work:
            order += [o.request_id for o in engine.step() if o.request_id not in order]
        return [names[r] for r in order]

    # the first takes one row and keeps it; the others share the second row, one after another: those sharing
    # the first one's experts go before the older, dissimilar one
    assert run(max_wait=100) == [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    # with a bound of 3 steps, the dissimilar one is overdue when the row frees: it goes before the younger one
    assert run(max_wait=3) == [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
