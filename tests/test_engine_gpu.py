"""On a CUDA device: every family and expert backend equals transformers, and the device budget is honoured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.errors import BudgetError
from tests.families import FAMILIES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]


@pytest.mark.parametrize("backend", ["loop", "batched", "grouped", "triton"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_matches_transformers(checkpoints: dict[str, Path], family: str, backend: str) -> None:
    path = checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    ids = torch.tensor(PROMPT, device="cuda")
    want = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, 10:
    ].tolist()
    with torch.no_grad():
        want_logits = ref(ids).logits
    for slots in (2, None):
        llm = LLM(
            path, device="cuda", dtype="float32", num_slots=slots, expert_backend=backend, progress=False
        )
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert out.token_ids == want
        with torch.no_grad():
            got = llm.loaded.model(ids).logits
        torch.testing.assert_close(got, want_logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_cuda_budget_is_honoured(checkpoints: dict[str, Path], decode: str) -> None:
    """From a process with no cuBLAS workspace (cleared first: they are what a GPU run holds beside KV and
    activations), the peak stays within device_memory; a reserve below what the runtime holds is refused."""
    path = checkpoints["mixtral"]
    probe = LLM(path, device="cuda", dtype="float32", num_slots=2, decode="eager", progress=False)
    dense, per = probe.info.dense_bytes, probe.info.expert_bytes
    del probe
    with pytest.raises(BudgetError, match="kv_reserve 8.00 MiB cannot hold what the GPU runtime keeps"):
        LLM(path, device="cuda", dtype="float32", device_memory=dense + 4 * per + 8 * 2**20, kv_reserve="8MiB",
            decode=decode, progress=False)  # fmt: skip
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    reserve = 128 * 2**20
    budget = dense + 4 * per + reserve
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(path, device="cuda", dtype="float32", device_memory=budget, kv_reserve=reserve, decode=decode,
              progress=False)  # fmt: skip
    assert llm.store.num_slots == 4, llm.memory.describe()
    llm.generate(PROMPT * 2, SamplingParams(max_tokens=16, ignore_eos=True))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget, (
        f"peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB ({llm.memory.describe()})"
    )
    assert llm.store.host.is_pinned()


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_cuda_async_prefetch_drops_and_promotes_and_keeps_outputs(
    checkpoints: dict[str, Path], family: str, decode: str
) -> None:
    """The eager path's store counts every prefetch it was handed (the policy's, plus those it dropped uncopied);
    the graph decode's plans cancel a prefetch into a slot the running step may fill before the store sees it,
    so there the store's prefetches are exactly the policy's."""
    from tests.test_engine import _NextLayerPrefetch, greedy_ref, reference

    path = checkpoints[family]
    want = greedy_ref(reference(path), PROMPT[0], 12)
    llm = LLM(path, device="cuda", dtype="float32", num_slots=4, policy=_NextLayerPrefetch(), decode=decode,
              progress=False)  # fmt: skip
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == want
    s, p = llm.store.stats, llm.policy.stats
    assert s.prefetch_loads > 0
    if decode == "eager":
        assert s.prefetch_loads == p.prefetches + p.prefetch_dropped
    else:
        assert s.prefetch_loads == p.prefetches and s.prefetch_dropped == 0
    assert llm.store.copy_s > 0


def test_cuda_copies_into_one_slot_land_in_issue_order(checkpoints: dict[str, Path]) -> None:
    """A prefetch held back on its stream, then a demand load into the same slot on the demand stream: the slot
    must end up holding the demand load's expert (the later copy waits for the earlier one)."""
    from moeflow.experts.cache import Load

    llm = LLM(checkpoints["olmoe"], device="cuda", dtype="float32", num_slots=4, progress=False)
    store = llm.store
    assert (0, 1) in store.host_row and (0, 2) in store.host_row  # prefetches copy straight from pinned RAM
    hold = torch.cuda.Stream()
    with torch.cuda.stream(hold):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
        gate = torch.cuda.Event()
        gate.record(hold)
    store._released[0] = gate  # the prefetch into slot 0 must wait for the sleep
    store.prefetch([Load((0, 1), 0, prefetch=True)], step=0, layer=-1)
    store._released[0] = None  # the demand copy does not wait for the gate itself
    store.load([Load((0, 2), 0)])
    torch.cuda.synchronize()
    want = torch.empty_like(store.slots[0], device="cpu")  # a host row: the checkpoint reads into RAM
    store.loaded.read_expert(0, 2, want)
    assert torch.equal(store.slots[0], want.to("cuda"))
