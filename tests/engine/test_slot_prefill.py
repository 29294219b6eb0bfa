"""Prefill through the slot table (``prefill="slots"``) on the CPU, where the slot-table experts run their torch
reference: tokens equal transformers' for every family and cache size; padded batches; the policy plans no layer
of the prefill and learns its routing from one settle; recording and replay see the prefill's routing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.slot_prefill import MAX_PAIRS, wants_slots
from moeflow.errors import ConfigError
from moeflow.experts.policies.classic import LRUPolicy
from tests.families import FAMILIES
from tests.test_engine import PROMPT, greedy_ref, reference


class _Counting(LRUPolicy):
    """LRU that counts the eager layers it planned and the static steps it settled."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.settled: list[int] = []

    def request(self, layer, experts):  # type: ignore[override]
        self.requests += 1
        return super().request(layer, experts)

    def settle_step(self, routing) -> None:  # type: ignore[override]
        self.settled.append(routing.experts.shape[1])
        super().settle_step(routing)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slot_prefill_matches_transformers(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    want = greedy_ref(reference(path), PROMPT[0], 6)
    for slots in (2, 5, None):
        llm = LLM(path, device="cpu", num_slots=slots, decode="static", prefill="slots", progress=False)
        out = llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert out.token_ids == want, slots
        s = llm.store.stats
        assert s.demand_loads == 0  # nothing was loaded before a layer: misses were read from host memory
        assert s.bytes_to_device == s.prefetch_loads * llm.info.expert_bytes + s.bytes_zero_copy


def test_slot_prefill_padded_batch(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["gpt_oss"]  # sliding-window layers
    ref = reference(path)
    prompts = [PROMPT[0] * 3, PROMPT[0][:4], [9, 8, 7, 6, 5, 4, 3]]
    want = [greedy_ref(ref, p, 10) for p in prompts]
    llm = LLM(path, device="cpu", num_slots=3, decode="static", prefill="slots", progress=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


def test_slot_prefill_settles_once_and_plans_no_layer(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    prompts = [PROMPT[0] * 2, PROMPT[0][:3]]
    counts = {}
    for mode in ("slots", "eager"):
        policy = _Counting()
        llm = LLM(
            path, device="cpu", num_slots=6, decode="static", prefill=mode, policy=policy, progress=False
        )
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        counts[mode] = (policy.requests, policy.settled, policy.stats.hits + policy.stats.misses)
    real = len(prompts[0]) + len(prompts[1])  # padding rows are not settled
    assert counts["slots"][0] == 0 and counts["slots"][1] == [real, 2, 2, 2]
    assert counts["eager"][0] > 0 and counts["eager"][1] == [2, 2, 2]
    assert (
        counts["slots"][2] == counts["eager"][2]
    )  # the same accesses counted: each used (layer, expert) once


def test_slot_prefill_records_and_replays(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_moe"]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    eager = LLM(
        path, device="cpu", num_slots=4, record_trace=True, decode="static", prefill="eager", progress=False
    )
    eager.generate(PROMPT, params)
    slots = LLM(
        path, device="cpu", num_slots=4, record_trace=True, decode="static", prefill="slots", progress=False
    )
    slots.generate(PROMPT, params)
    a, b = eager.trace(), slots.trace()
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-6)
    moved = dataclasses.replace(
        a, experts=(a.experts + 1) % slots.info.num_experts
    )  # not the routers' choice
    replayed = LLM(path, device="cpu", num_slots=4, replay=moved, decode="static", prefill="slots",
                   record_trace=True, progress=False)  # fmt: skip
    replayed.generate(PROMPT, params, request_ids=[0])
    np.testing.assert_array_equal(replayed.trace().experts, moved.experts)


def test_prefill_mode_choice(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown prefill mode"):
        LLM(checkpoints["olmoe"], device="cpu", decode="static", prefill="fast", progress=False)
    llm = LLM(checkpoints["olmoe"], device="cpu", decode="static", progress=False)
    assert not wants_slots("auto", llm.static, 8)  # a CPU prefills eagerly unless asked
    assert wants_slots("slots", llm.static, MAX_PAIRS * 4) and not wants_slots("eager", llm.static, 8)
