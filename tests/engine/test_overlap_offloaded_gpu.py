"""On a CUDA device: the offloaded overlap (``EngineConfig.overlap_offloaded``) in graph decode, misses read
zero-copy and filled by the kernel, the last step's fills folded into the table inside the captured step: the serial
graph decode's tokens, and every slot the policy places an expert in holds that expert, with the step compiled and
not; and on the demo model in bf16 with its routing replayed, 25% of the experts cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.model.loader import open_model
from moeflow.routing.trace import Trace
from tests.engine.test_overlap import PROMPTS
from tests.engine.test_overlap_gpu import TRACE, trace_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def assert_slots_hold_their_experts(llm: LLM) -> None:
    torch.cuda.synchronize()
    pool = llm.static.table.tensors.pool  # type: ignore[union-attr]
    held = [(slot, key) for slot, key in enumerate(llm.policy.key_in) if key is not None]
    assert held
    for slot, key in held:
        assert torch.equal(pool[slot].cpu(), llm.store.host_row_of(key).cpu()), (
            f"slot {slot} does not hold {key}"
        )


@pytest.mark.parametrize(("family", "compiled"), [("olmoe", False), ("qwen3_moe", True)])
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_offloaded_overlapped_graph_decode_equals_serial(
    checkpoints: dict[str, Path], family: str, compiled: bool, policy: str
) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = []
    for offloaded in (False, True):
        llm = LLM(checkpoints[family], device="cuda", dtype="float32", decode="graph", compile=compiled,
                  num_slots=6, policy=policy, overlap_offloaded=offloaded, progress=False)  # fmt: skip
        outs.append([o.token_ids for o in llm.generate(PROMPTS, params) + llm.generate(PROMPTS[:2], params)])
        assert_slots_hold_their_experts(llm)
    assert outs[1] == outs[0]
    assert llm.overlap is not None and llm.overlap.stats.kept == 2 * (12 - 2)
    assert llm.policy.stats.misses > 0 and llm.store.stats.bytes_zero_copy > 0


@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_demo_model_bf16_offloaded_overlap_equals_serial(policy: str) -> None:
    trace = Trace.load(TRACE)
    ids, prompts = trace_prompts(trace)
    lm = open_model(DEMO, torch.device("meta"))
    slots = len(lm.layers) * lm.num_experts // 4
    outs = []
    for offloaded in (False, True):
        llm = LLM(DEMO, device="cuda", decode="graph", replay=trace, num_slots=slots, policy=policy,
                  overlap_offloaded=offloaded, progress=False)  # fmt: skip
        got = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True), request_ids=ids)
        outs.append([o.token_ids for o in got])
        assert_slots_hold_their_experts(llm)
    assert outs[1] == outs[0]
    assert llm.overlap is not None and llm.overlap.stats.kept > 0
