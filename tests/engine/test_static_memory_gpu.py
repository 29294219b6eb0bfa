"""On a CUDA device, at real expert sizes (OLMoE's 12.6 MB, Mixtral's 336 MiB): the graph decode's peak device
memory stays within ``device_memory`` at decode batch 1, 8 and 32, compiled step, slot pool, KV cache, graph
memory pool and every scratch buffer included. Two layers of each geometry keep the checkpoints small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.model.synth import synthesize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", params=["olmoe", "mixtral"])
def geometry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(request.param, tmp_path_factory.mktemp(request.param), num_layers=2)


@pytest.mark.parametrize(("batch", "prompt_len"), [(1, 0), (8, 0), (32, 0), (8, 480)])
def test_graph_decode_peak_memory_within_the_budget(geometry: Path, batch: int, prompt_len: int) -> None:
    """``prompt_len`` > 0: prompts of that many tokens, whose prefill activations (8 x 480 tokens: ~0.5 GB at OLMoE
    geometry) do not fit the 256 MiB reserve in one forward: the prefill runs in column blocks."""
    probe = LLM(geometry, device="cuda", dtype="bfloat16", num_slots=8, decode="eager", progress=False)
    dense, per, total = (
        probe.info.dense_bytes,
        probe.info.expert_bytes,
        probe.info.num_layers * probe.info.num_experts,
    )
    prompt = probe.tokenizer("def fibonacci(n):")["input_ids"] if probe.tokenizer else list(range(3, 20))
    prompt = list(range(3, 3 + prompt_len)) if prompt_len else prompt
    del probe
    torch.cuda.empty_cache()
    budget = (
        dense + max(total // 4, 8) * per + 256 * 2**20
    )  # a quarter of the experts, and a 256 MiB KV reserve
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(geometry, device="cuda", dtype="bfloat16", device_memory=budget, kv_reserve="256MiB", decode="graph",
              batch_size=batch, progress=False)  # fmt: skip
    assert llm.static is not None and llm.store.num_slots < total
    outs = llm.generate([prompt] * batch, SamplingParams(max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget, f"peak {peak / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
    del llm
    torch.cuda.empty_cache()


def test_reconfigure_and_recapture_leave_no_memory_behind(geometry: Path) -> None:
    """Every reconfigure starts a new slot table, buckets and captured graphs: what the old ones held must go (a
    fresh capture stream each time left a cuBLAS workspace behind, +64 MiB per capture, seen in the peers' peaks)."""
    llm = LLM(geometry, device="cuda", dtype="bfloat16", num_slots=8, decode="graph", progress=False)
    prompt = list(range(3, 20))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    first = torch.cuda.memory_allocated()
    for policy in ("lfu", "lru", "lfu", "lru"):
        llm.reconfigure(policy=policy, num_slots=8)
        llm.generate([prompt], params)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - first
    assert grown <= 8 * 2**20, f"{grown / 2**20:.0f} MiB more allocated after four reconfigures"
