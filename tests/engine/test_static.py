"""The static decode path on the CPU (the same step the GPU captures in a graph, run eagerly, with the torch
reference of the slot-table kernel): tokens equal transformers' for every family and cache size, batches with
padding and early finishes, recording and replay; the slot table follows the policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.experts.policies.classic import LRUPolicy
from tests.families import FAMILIES
from tests.test_engine import PROMPT, greedy_ref, reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_decode_matches_transformers(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    want = greedy_ref(reference(path), PROMPT[0], 8)
    for slots in (2, 5, None):
        llm = LLM(path, device="cpu", num_slots=slots, decode="static", progress=False)
        assert llm.static is not None
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert out.token_ids == want, slots
        s, p = llm.store.stats, llm.policy.stats
        assert p.hits + p.misses > 0 and (s.bytes_zero_copy > 0 or slots is None)
        # every byte that crossed: prefill demand loads, decode misses read from host, prefetch copies
        assert (
            s.bytes_to_device
            == (s.demand_loads + s.prefetch_loads) * llm.info.expert_bytes + s.bytes_zero_copy
        )


def test_static_batch_with_padding_and_early_finish(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["gpt_oss"]  # sliding-window layers: the masks must follow the window
    ref = reference(path)
    prompts = [PROMPT[0] * 3, PROMPT[0][:4], [9, 8, 7, 6, 5, 4, 3]]
    want = [greedy_ref(ref, p, 20) for p in prompts]
    llm = LLM(path, device="cpu", num_slots=3, decode="static", progress=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    stop = llm.tokenizer.decode(want[1][:3])  # the second prompt stops early (after its third token)
    outs = llm.generate(prompts[1:], SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,)))
    assert outs[0].finish_reason == "stop" and outs[1].token_ids == want[2]


class _NoFills(LRUPolicy):
    def fill_budget(self, batch: int) -> int:
        return 0


def test_static_fills_make_later_hits(checkpoints: dict[str, Path]) -> None:
    """A missed expert written into a reserved slot as it is read is a hit later: LRU never copies in static
    decode, so its decode hits beyond what the prefill left come from read-through fills. The device table (with
    the last step's fills, published at the next boundary) agrees with the policy's residency."""
    path = checkpoints["olmoe"]
    rec = LLM(path, device="cpu", num_slots=16, record_trace=True, progress=False)
    rec.generate(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))
    hits = {}
    for name, policy in (("fills", LRUPolicy()), ("none", _NoFills())):
        llm = LLM(
            path,
            device="cpu",
            num_slots=8,
            replay=rec.trace(),
            decode="static",
            policy=policy,
            progress=False,
            overlap_offloaded=False,  # the serial order (the lagged one: tests/engine/test_overlap_offloaded.py)
        )
        llm.generate(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True), request_ids=[0])
        assert llm.store.stats.prefetch_loads == 0
        hits[name] = llm.policy.stats.hits
        t = llm.static.table.tensors  # the table as uploaded before the last step, plus that step's fills
        seen = {}
        for grid in (t.table.numpy(), t.filled.numpy()):
            seen.update({(int(lay), int(e)): int(grid[lay, e]) for lay, e in zip(*np.nonzero(grid >= 0))})
        assert seen == {key: slot for slot, key in enumerate(llm.policy.key_in) if key is not None}
    assert hits["fills"] > hits["none"]


def test_static_records_and_replays_the_same_routing(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_moe"]
    eager = LLM(path, device="cpu", num_slots=4, record_trace=True, decode="eager", progress=False)
    eager.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    static = LLM(path, device="cpu", num_slots=4, record_trace=True, decode="static", progress=False)
    static.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    a, b = eager.trace(), static.trace()
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-6)
    replayed = LLM(
        path, device="cpu", num_slots=4, replay=a, decode="static", record_trace=True, progress=False
    )
    out = replayed.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), request_ids=[0])[0]
    assert out.token_ids == eager.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    np.testing.assert_array_equal(replayed.trace().experts, a.experts)


def test_graph_mode_needs_cuda(checkpoints: dict[str, Path]) -> None:
    from moeflow.errors import RequestError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RequestError, match="needs a CUDA device"):
        LLM(checkpoints["olmoe"], device="cpu", decode="graph", progress=False)


def test_static_kv_cache_is_held_to_the_kv_reserve(checkpoints: dict[str, Path]) -> None:
    from moeflow.errors import BudgetError

    path = checkpoints["olmoe"]
    roomy = LLM(path, device="cpu", num_slots=4, kv_reserve="64MiB", decode="static", progress=False)
    roomy.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    used = roomy.static._buckets[next(iter(roomy.static._buckets))].kv.bytes()
    assert 0 < used <= 64 * 2**20
    tight = LLM(path, device="cpu", num_slots=4, kv_reserve=used - 1, decode="static", progress=False)
    with pytest.raises(BudgetError, match="more than the KV reserve"):
        tight.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
