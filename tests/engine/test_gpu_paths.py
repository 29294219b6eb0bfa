"""On a CUDA device: continuous batching and quantised experts give the outputs they give on the CPU path's terms
(continuous batching: each prompt as if run alone; quantised experts: the model with dequantised experts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.batch import BatchEngine
from tests.engine.test_batch import PROMPTS, drain, greedy
from tests.engine.test_quant_experts import PROMPT, dequantised_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("slots", [2, None])
def test_continuous_batching_on_cuda_equals_prompts_run_alone(
    checkpoints: dict[str, Path], family: str, slots: int | None
) -> None:
    with LLM(checkpoints[family], device="cuda", dtype="float32", num_slots=slots, progress=False,
             batch_size=4) as llm:  # fmt: skip
        want = [llm.generate([p], greedy())[0] for p in PROMPTS]
        engine = BatchEngine(llm, max_batch=3, prefill_chunk=5)
        ids = [engine.add(p, greedy()) for p in PROMPTS[:3]]
        seen = drain(engine, steps=2)
        ids += [engine.add(p, greedy()) for p in PROMPTS[3:]]  # join a batch that is already decoding
        drain(engine, seen=seen)
        for rid, out in zip(ids, want):
            assert seen[rid][-1].output is not None
            assert seen[rid][-1].output.token_ids == out.token_ids


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_quantised_experts_on_cuda_equal_the_dequantised_model(
    checkpoints: dict[str, Path], family: str, fmt: str
) -> None:
    path = checkpoints[family]
    for slots in (2, None):
        llm = LLM(path, device="cuda", dtype="float32", num_slots=slots, progress=False, expert_dtype=fmt)
        ref = dequantised_reference(path, llm.loaded.layers, llm.loaded.layout, fmt).to("cuda")
        ids = torch.tensor(PROMPT, device="cuda")
        out = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert got.token_ids == out[0, len(PROMPT[0]) :].tolist()
        with torch.no_grad():
            torch.testing.assert_close(llm.loaded.model(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-4)
