"""Continuous batching on the static decode path (``engine/static_rows.py``): sequences join and leave the rows of one
static bucket without a new bucket (on a GPU: without a new graph), a bucket replaced by a longer one carries every
row's keys over, the policy sees the hooks ``LLM.generate`` makes, and the KV reserve holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeflow import LLM
from moeflow.engine.batch import BatchEngine
from moeflow.engine.static_rows import StaticRows
from moeflow.experts.policies.classic import LRUPolicy
from tests.engine.test_batch import PROMPTS, drain, greedy


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]):
    with LLM(checkpoints["gpt_oss"], device="cpu", progress=False, batch_size=4, decode="static") as engine:
        yield engine


def row_buckets(llm: LLM) -> list:
    return [b for key, b in llm.static._buckets.items() if len(key) == 3]


def test_sequences_join_and_leave_one_bucket(llm: LLM) -> None:
    lengths = (3, 12, 5, 9, 4, 7)
    want = [llm.generate([p], greedy(n))[0].token_ids for p, n in zip(PROMPTS, lengths)]
    engine = BatchEngine(llm, max_batch=3, prefill_chunk=6)
    assert isinstance(engine.kv, StaticRows)
    bucket = engine.kv.bucket
    ids = [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[:3], lengths)]
    buckets = set()
    seen = drain(engine, lambda *_: buckets.add(id(engine.kv.bucket)), steps=3)
    ids += [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[3:], lengths[3:])]
    drain(engine, lambda *_: buckets.add(id(engine.kv.bucket)), seen)
    assert [seen[r][-1].output.token_ids for r in ids] == want
    assert buckets == {id(bucket)} and row_buckets(llm) == [bucket]  # one bucket served every step
    assert bucket.kv.rows == 3 and bucket.kv.max_len == 256
    assert bucket.decoded  # decode steps were static ones (settled from the bucket's routing)
    assert engine.kv.free == 3


def test_a_longer_bucket_carries_every_row_over(llm: LLM) -> None:
    params = [greedy(14), greedy(9), greedy(20)]
    want = [llm.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    engine = BatchEngine(llm, max_batch=3, prefill_chunk=4)
    ids = [engine.add(p, q) for p, q in zip(PROMPTS[:3], params)]
    seen = drain(engine, steps=6)  # one prompt still being prefilled, the others decoding
    assert any(e.prefilled < len(e.seq.prompt_ids) for e in engine.running.values())
    old = engine.kv.bucket
    before = [(layer.keys.clone(), layer.values.clone()) for layer in old.kv.cache.layers]
    engine.kv.fit(300)
    assert engine.kv.bucket is not old and engine.kv.max_len == 512
    for (k, v), layer in zip(
        before, engine.kv.cache.layers
    ):  # every row's keys and values, in the same slots
        assert layer.keys.shape[2] == 512
        assert layer.keys[:, :, :256].equal(k) and layer.values[:, :, :256].equal(v)
    assert row_buckets(llm) == [engine.kv.bucket]  # the shorter bucket is gone
    drain(engine, seen=seen)
    assert [seen[r][-1].output.token_ids for r in ids] == want


class Recording(LRUPolicy):
    """LRU that logs the engine's calls to its hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []

    def begin_step(self, info) -> None:
        self.log.append(("begin", info.request_ids, info.token_ids, info.positions, info.prefill))
        super().begin_step(info)

    def observe(self, layer, experts, weights=None) -> None:
        self.log.append(("observe", layer, experts.tolist()))
        super().observe(layer, experts, weights)

    def plan_boundary(self, batch: int):
        self.log.append(("boundary", batch))
        return super().plan_boundary(batch)

    def settle_step(self, routing) -> None:
        self.log.append(("settle", routing.experts.tolist(), np.asarray(routing.served).tolist()))
        super().settle_step(routing)

    def end_step(self) -> None:
        self.log.append(("end",))
        super().end_step()

    def end_request(self, request_id: int) -> None:
        self.log.append(("end_request", request_id))
        super().end_request(request_id)


def test_policy_sees_the_hooks_of_the_llm_path(checkpoints: dict[str, Path]) -> None:
    logs, stats = [], []
    for batched in (False, True):
        policy = Recording()
        with LLM(checkpoints["olmoe"], device="cpu", num_slots=6, decode="static", policy=policy,
                 progress=False) as llm:  # fmt: skip
            if batched:
                engine = BatchEngine(llm, max_batch=2)
                engine.add(PROMPTS[2], greedy(6), request_id=7)
                drain(engine)
            else:
                llm.generate([PROMPTS[2]], greedy(6), request_ids=[7])
            logs.append(policy.log)
            stats.append((policy.stats.hits, policy.stats.misses, llm.store.stats.bytes_to_device))
    assert any(entry[0] == "settle" for entry in logs[0])
    assert ("end_request", 7) in logs[0]
    assert logs[1] == logs[0]
    assert stats[1] == stats[0]


def test_the_row_bucket_is_held_to_the_kv_reserve(checkpoints: dict[str, Path]) -> None:
    from moeflow.errors import BudgetError

    path = checkpoints["olmoe"]
    with LLM(path, device="cpu", num_slots=4, kv_reserve="64MiB", decode="static", progress=False) as roomy:
        engine = BatchEngine(roomy, max_batch=2)
        engine.add(PROMPTS[0], greedy(3))
        drain(engine)
        used = engine.kv.kv.bytes()
    assert 0 < used <= 64 * 2**20
    with LLM(path, device="cpu", num_slots=4, kv_reserve=used - 1, decode="static", progress=False) as tight:
        engine = BatchEngine(tight, max_batch=2)
        engine.add(PROMPTS[0], greedy(3))
        with pytest.raises(BudgetError, match="more than the KV reserve"):
            drain(engine)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss"])
def test_compiled_step_serves_the_rows(
    checkpoints: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step a GPU compiles (and captures) traces in one graph through the row writes and masks (aot_eager:
    the same tracing as inductor) and its tokens are those of the prompts run alone."""
    import torch

    from moeflow.engine import static

    monkeypatch.setattr(static, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    with LLM(checkpoints[family], device="cpu", num_slots=3, host_memory="1GiB", decode="static", compile=True,
             progress=False) as llm:  # fmt: skip
        want = [llm.generate([p], greedy(6))[0].token_ids for p in PROMPTS[:4]]
        engine = BatchEngine(llm, max_batch=3, prefill_chunk=5)
        ids = [engine.add(p, greedy(6)) for p in PROMPTS[:2]]
        seen = drain(engine, steps=2)
        ids += [engine.add(p, greedy(6)) for p in PROMPTS[2:4]]
        drain(engine, seen=seen)
        assert [seen[r][-1].output.token_ids for r in ids] == want
        assert llm.static.step != llm.static._forward  # it ran compiled (compile=True raises on a failure)


def test_a_new_slot_pool_mid_run_keeps_the_rows(checkpoints: dict[str, Path]) -> None:
    """``LLM.reconfigure`` between steps starts the decoder's buckets afresh: the running rows move to the new one."""
    with LLM(checkpoints["mixtral"], device="cpu", num_slots=8, decode="static", progress=False) as llm:
        want = [llm.generate([p], greedy(10))[0].token_ids for p in PROMPTS[:3]]
        engine = BatchEngine(llm, max_batch=3, prefill_chunk=8)
        ids = [engine.add(p, greedy(10)) for p in PROMPTS[:3]]
        seen = drain(engine, steps=4)
        old = engine.kv.bucket
        llm.reconfigure(num_slots=5)
        drain(engine, seen=seen)
        assert engine.kv.bucket is not old and row_buckets(llm) == [engine.kv.bucket]
        assert [seen[r][-1].output.token_ids for r in ids] == want


def test_max_len_sizes_the_bucket_from_the_start(llm: LLM) -> None:
    engine = BatchEngine(llm, max_batch=2, max_len=300)
    assert engine.kv.max_len == 512
    engine.add(PROMPTS[0], greedy(4))
    drain(engine)
    assert engine.kv.max_len == 512  # short requests keep the bucket
