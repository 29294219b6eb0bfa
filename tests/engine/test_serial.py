"""Models whose state the row KV pool cannot hold (here a hybrid with state-space layers): ``BatchEngine`` refuses
them in one line, and ``SerialEngine`` serves the same API one request at a time, equal to ``LLM.generate``."""

from __future__ import annotations

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.batch import BatchEngine
from moeflow.engine.serial import SerialEngine
from moeflow.errors import RequestError
from tests.families import save_random, tiny_config


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory):
    path = save_random(
        tiny_config("granitemoehybrid"), tmp_path_factory.mktemp("hybrid") / "granitemoehybrid"
    )
    with LLM(path, device="cpu", progress=False) as llm:
        yield llm


def test_hybrid_is_served_one_at_a_time(hybrid: LLM) -> None:
    with pytest.raises(RequestError, match="one request at a time"):
        BatchEngine(hybrid)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = [[3, 9, 4], [7, 1], [5, 5, 8, 2]]
    want = [hybrid.generate([p], params)[0].token_ids for p in prompts]
    engine = SerialEngine(hybrid)
    ids = [engine.add(p, params) for p in prompts]
    engine.step()
    assert engine.abort(ids[1]) and not engine.abort(ids[1])  # waiting: dropped
    engine.step()
    done = {}
    while engine.has_work:
        for out in engine.step():
            assert set(engine.running) <= {out.request_id}
            if out.finished:
                done[out.request_id] = out.output
    assert [done[ids[0]].token_ids, done[ids[2]].token_ids] == [want[0], want[2]]
    assert done[ids[0]].request_id == ids[0]
