"""On a CUDA device: prefill through the slot table (the Triton slot kernel with prefill tiles, misses read from
pinned host memory) equals transformers, for short and long prompts, padded batches, and "auto" takes it when the
pool holds every expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.engine.slot_prefill import wants_slots
from tests.families import FAMILIES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slot_prefill_matches_transformers(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    short = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]
    long = [(7 * i + 3) % 250 + 1 for i in range(240)]  # many tokens per expert: several BLOCK_M tiles each
    for prompt in (short, long):
        want = _greedy(ref, prompt, 6)
        for slots in (3, None):
            llm = LLM(path, device="cuda", dtype="float32", num_slots=slots, decode="graph", prefill="slots",
                      compile=False, progress=False)  # fmt: skip
            out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
            assert out.token_ids == want, (family, len(prompt), slots)
            assert llm.store.stats.demand_loads == 0


def test_auto_takes_slots_when_every_expert_fits(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    prompts = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8], [9, 8, 7, 6]]
    want = [_greedy(ref, p, 5) for p in prompts]
    full = LLM(path, device="cuda", dtype="float32", decode="graph", compile=False, progress=False)
    assert wants_slots("auto", full.static, 64)
    outs = full.generate(
        prompts, SamplingParams(max_tokens=5, ignore_eos=True)
    )  # padded: the second is shorter
    assert [o.token_ids for o in outs] == want
    assert full.store.stats.demand_loads == 0
    part = LLM(
        path, device="cuda", dtype="float32", num_slots=3, decode="graph", compile=False, progress=False
    )
    assert not wants_slots("auto", part.static, 64)
