"""On a CUDA device: continuous batching decodes through the captured graph of one static bucket (float32, the tiny
checkpoints): sequences that join a decoding batch, finish early or are aborted leave the others' tokens as they
are alone, and the bucket's graph is captured once for all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM
from moeflow.engine.batch import BatchEngine
from tests.engine.test_batch import PROMPTS, drain, greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("compiled", [False, True])
def test_graph_rows_equal_prompts_run_alone(
    checkpoints: dict[str, Path], family: str, compiled: bool
) -> None:
    with LLM(checkpoints[family], device="cuda", dtype="float32", num_slots=6, decode="graph", compile=compiled,
             progress=False) as llm:  # fmt: skip
        lengths = (4, 12, 6, 9, 3, 8)
        want = [llm.generate([p], greedy(n))[0].token_ids for p, n in zip(PROMPTS, lengths)]
        engine = BatchEngine(llm, max_batch=3, prefill_chunk=5)
        ids = [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[:3], lengths)]
        seen = drain(engine, steps=3)
        while (
            engine.kv.bucket.graph is None and engine.has_work
        ):  # the prompts' chunks first, then a decode step
            drain(engine, seen=seen, steps=1)
        graph = engine.kv.bucket.graph
        assert graph is not None  # the decode steps replay the bucket's graph
        gone = engine.add(PROMPTS[0], greedy(40))
        ids += [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[3:], lengths[3:])]
        drain(engine, seen=seen, steps=4)
        assert engine.abort(gone)
        drain(engine, seen=seen)
        assert [seen[r][-1].output.token_ids for r in ids] == want
        assert engine.kv.bucket.graph is graph and engine.kv.free == 3
