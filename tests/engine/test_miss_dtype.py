"""``miss_dtype``: a hit computes with the full-precision expert in its slot, a miss with the expert's low-precision
copy (which the policy still admits at full precision). With every expert resident outputs equal full precision;
with few slots a layer's output equals the experts function over weights that are dequantised exactly for the
experts that missed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import RowCodec

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]


def test_all_resident_equals_full_precision(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    full = LLM(path, device="cpu", progress=False)
    mixed = LLM(path, device="cpu", progress=False, miss_dtype="int4")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = mixed.generate(PROMPT, params)[0]
    assert first.stats.misses > 0  # cold slots: the first uses are misses, computed in int4
    with torch.no_grad():
        want = full.loaded.model(torch.tensor(PROMPT)).logits
        misses = mixed.policy.stats.misses
        got = mixed.loaded.model(torch.tensor(PROMPT)).logits  # every expert it needs is resident now
    assert mixed.policy.stats.misses == misses
    assert torch.equal(got, want)
    assert mixed.generate(PROMPT, params)[0].token_ids == full.generate(PROMPT, params)[0].token_ids


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_misses_compute_with_the_low_precision_copy(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    llm = LLM(path, device="cpu", num_slots=3, progress=False, miss_dtype="int2")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = llm.loaded.layers[0]
    layout = llm.loaded.layout
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, llm.loaded.config.hidden_size, generator=gen)
    weights = torch.rand(4, 2, generator=gen)
    for index in ([[0, 1], [1, 2], [0, 2], [1, 0]], [[0, 3], [3, 4], [4, 0], [3, 0]]):
        idx = torch.tensor(index)
        missed = [e for e in sorted(set(idx.flatten().tolist())) if not llm.policy.resident((0, e))]
        assert missed  # the second batch misses 3 and 4 at least
        module = copy.deepcopy(ref.get_submodule(layer.path))
        codec = RowCodec(layout, FORMATS["int2"], bool(getattr(module, "is_transposed", False)))
        with torch.no_grad():
            for e in missed:  # the experts function over dequantised weights, for the misses only
                flat = torch.cat([getattr(module, p.name)[e].reshape(-1) for p in layout.params])
                back = codec.decode(codec.encode(flat)[None], torch.float32)[0]
                for p in layout.params:
                    getattr(module, p.name)[e].copy_(back[p.offset : p.offset + p.numel].view(p.shape))
            want = module(hidden, idx, weights)
            got = layer.module(hidden, idx, weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for e in missed:  # admitted at full precision: the slot holds the full expert
            slot = llm.policy.slot_of[(0, e)]
            row = torch.empty(layout.numel)
            llm.loaded.read_full(0, e, row)
            assert torch.equal(llm.store.slots[slot], row)


def test_few_slots_differ_from_full_precision(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    with torch.no_grad():
        want = LLM(path, device="cpu", num_slots=2, progress=False).loaded.model(torch.tensor(PROMPT)).logits
        got = (
            LLM(path, device="cpu", num_slots=2, progress=False, miss_dtype="int2")
            .loaded.model(torch.tensor(PROMPT))
            .logits
        )
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-4)
