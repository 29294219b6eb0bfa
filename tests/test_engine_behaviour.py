"""Engine behaviours the older tests did not pin down: top-p's support, stop strings (cut and held back while
streaming), a sequence finishing mid-batch, LLM.close() saving what a policy learned, and reconfigure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.errors import RequestError
from moeflow.experts.cache import StepInfo
from moeflow.experts.policies.classic import LFUPolicy, LRUPolicy
from moeflow.sampling import sample

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]


def greedy_ref(path: Path, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def test_top_p_keeps_exactly_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, SamplingParams(temperature=1.0, top_p=0.75), gen)) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.75 <= 0.8: the first two tokens, never the tail
    assert 0.5 < draws.count(0) / 400 < 0.75  # renormalised 0.5 / 0.8 = 0.625
    only = [int(sample(logits, SamplingParams(temperature=1.0, top_p=0.4), gen)) for _ in range(50)]
    assert set(only) == {0}


def test_stop_string_cuts_and_streaming_holds_it_back(checkpoints: dict[str, Path]) -> None:
    llm = LLM(checkpoints["olmoe"], device="cpu", num_slots=4, progress=False)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    full = llm.generate("def fib(n):", params)[0].text
    assert len(full) >= 6, f"the test needs a longer output, got {full!r}"
    stop = full[3:6]
    want = full[: full.find(stop)]
    cut = llm.generate("def fib(n):", SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == want
    shown = ""
    for delta in llm.stream("def fib(n):", SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))):
        shown += delta.text
        assert want.startswith(shown), f"streamed {shown!r}, beyond the final text {want!r}"
    assert shown == want


class _Recorder(LRUPolicy):
    """LRU that records which requests were live each step and when each ended."""

    def __init__(self) -> None:
        super().__init__()
        self.live: list[tuple[int, ...]] = []
        self.ended: list[tuple[int, int]] = []  # (request id, steps begun so far)

    def begin_step(self, info: StepInfo) -> None:
        super().begin_step(info)
        self.live.append(info.request_ids)

    def end_request(self, request_id: int) -> None:
        super().end_request(request_id)
        self.ended.append((request_id, len(self.live)))


def test_a_sequence_finishing_mid_batch_ends_its_request(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    prompts = ["def fib(n):", "import os"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    probe = LLM(path, device="cpu", num_slots=4, progress=False, batch_size=2)
    a, b = (o.text for o in probe.generate(prompts, params))
    stop = next((a[:n] for n in range(1, len(a) + 1) if a[:n] not in b and a[:n].strip()), None)
    assert stop is not None and len(stop) < len(a), (a, b)
    policy = _Recorder()
    llm = LLM(path, device="cpu", num_slots=4, policy=policy, progress=False, batch_size=2)
    first, second = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True, stop=(stop,)))
    assert first.finish_reason == "stop" and second.finish_reason == "length" and len(second.token_ids) == 10
    assert sorted(r for r, _ in policy.ended) == [first.request_id, second.request_id]  # each ended once
    ended_at = dict(policy.ended)
    assert ended_at[first.request_id] < ended_at[second.request_id] == len(policy.live)
    after = policy.live[ended_at[first.request_id] :]
    assert after and all(first.request_id not in ids for ids in after)  # no longer routed once finished


def test_close_saves_what_moe_infinity_learned(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from moeflow.routing.eam import EAMCollection

    path, save = checkpoints["olmoe"], tmp_path / "eamc.npz"
    llm = LLM(
        path, device="cpu", num_slots=4, policy="moe-infinity", extra={"eamc_save": str(save)}, progress=False
    )
    llm.generate([[5, 17, 42], [7, 8, 9, 10]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert not save.exists()
    llm.close()
    saved = EAMCollection.load(save, llm.info.num_layers, llm.info.num_experts)
    assert len(saved) == 2 and saved.members.sum() == 2


def test_reconfigure_swaps_policy_and_slots_keeping_outputs(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["mixtral"]
    want = greedy_ref(path, PROMPT, 6)
    llm = LLM(path, device="cpu", num_slots=8, host_memory="1GiB", progress=False)  # every expert preloaded
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert llm.generate([PROMPT], params)[0].token_ids == want
    llm.reconfigure(policy="lfu", num_slots=3)
    assert llm.store.num_slots == 3 and isinstance(llm.policy, LFUPolicy)
    out = llm.generate([PROMPT], params)[0]
    assert out.token_ids == want and out.stats.misses > 0
    assert llm.store.stats.bytes_from_disk == 0  # the host tier was kept: misses copy from RAM
    with pytest.raises(RequestError, match="cannot hold one token's 2 routed experts"):
        llm.reconfigure(num_slots=1)


@pytest.mark.parametrize("overlap", [False, True])
def test_reconfigure_frees_the_old_slot_pool_first(checkpoints: dict[str, Path], overlap: bool) -> None:
    """The static decoder's slot table holds the pool it was built on; reconfigure lets go of it before the new
    pool is allocated, so a budget is never exceeded by two pools alive at once (also with the overlapped decode,
    which remembers the table whose pool it filled)."""
    import gc
    import weakref

    llm = LLM(
        checkpoints["olmoe"], device="cpu", num_slots=6, decode="static", overlap=overlap, progress=False
    )
    llm.generate([PROMPT], SamplingParams(max_tokens=3, ignore_eos=True))  # the step builds its slot table
    assert llm.static is not None and llm.static.table.tensors.pool is llm.store.slots
    old = weakref.ref(llm.store.slots)
    llm.reconfigure(num_slots=5)
    gc.collect()
    assert old() is None
    assert llm.generate([PROMPT], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids


def test_long_prefill_shows_progress_over_the_layers(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeflow.engine import llm as engine

    monkeypatch.setattr(engine, "LONG_PREFILL", 8)  # tiny models have a context of 256: lower the threshold
    model = LLM(checkpoints["olmoe"], device="cpu", num_slots=4, progress=True)
    capsys.readouterr()
    model.generate([list(range(1, 11))], SamplingParams(max_tokens=2, ignore_eos=True))
    err = capsys.readouterr().err
    assert "prefill 10 tokens" in err and "2/2" in err
    model.generate([list(range(1, 5))], SamplingParams(max_tokens=2, ignore_eos=True))
    assert "prefill" not in capsys.readouterr().err  # a short prompt shows none
