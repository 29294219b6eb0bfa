"""``PRECOPY``: a layer's claimed misses are copied whole into their slots before the projections, which then read
them as hits. The op on the CPU, its Triton kernel in the interpreter, and the static decode on the CPU giving the
same tokens, hits, misses and fills as the read-through fill, full precision and int4."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.experts import ops  # noqa: F401  (registers the moeflow:: ops)
from tests.experts.interpreted import needs_triton, run_interpreted
from tests.test_engine import PROMPT


def _case() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    host = torch.randint(
        0, 255, (6, 40), dtype=torch.uint8, generator=g
    )  # 2 layers x 3 experts, rows of 40 bytes
    pool = torch.zeros(4, 40, dtype=torch.uint8)
    counts = torch.tensor([2, 0, 1], dtype=torch.int32)  # layer 1: experts 0 and 2 used, 1 not
    slot = torch.tensor([-1, -1, -1], dtype=torch.int32)  # none resident
    claim = torch.tensor([3, 1, -1], dtype=torch.int32)  # expert 1 claimed nothing it uses; 2 got no slot
    return counts, slot, claim, pool, host


def test_fill_claimed_copies_used_claimed_misses_only() -> None:
    counts, slot, claim, pool, host = _case()
    after = torch.ops.moeflow.fill_claimed(counts, slot, claim, pool, host, 3)
    assert after.tolist() == [3, -1, -1]  # expert 0 now reads slot 3; 1 is unused; 2 stays zero-copy
    assert torch.equal(pool[3], host[3])  # layer 1's expert 0 is host row 3
    assert not pool[:3].any()  # nothing else written
    resident = torch.tensor([2, -1, -1], dtype=torch.int32)  # a hit is never copied over
    pool.zero_()
    assert torch.ops.moeflow.fill_claimed(counts, resident, claim, pool, host, 3).tolist() == [2, -1, -1]
    assert not pool.any()


SCRIPT = textwrap.dedent(
    """
    import torch
    from moeflow.experts.precopy import fill_claimed
    from tests.experts.test_precopy import _case

    counts, slot, claim, pool, host = _case()
    fill_claimed(counts, slot, claim, pool, host, 3)
    assert torch.equal(pool[3], host[3]) and not pool[:3].any()
    big = torch.randint(0, 255, (4, 70000), dtype=torch.uint8)  # rows over one CHUNK: several programs each
    pool2 = torch.zeros(2, 70000, dtype=torch.uint8)
    fill_claimed(torch.tensor([1, 1], dtype=torch.int32), torch.tensor([-1, -1], dtype=torch.int32),
                 torch.tensor([1, 0], dtype=torch.int32), pool2, big, 2)
    assert torch.equal(pool2[1], big[2]) and torch.equal(pool2[0], big[3])
    print("ok")
    """
)


@needs_triton
def test_fill_claimed_kernel_in_the_interpreter() -> None:
    run_interpreted(SCRIPT)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_static_decode_with_precopy_equals_read_through(checkpoints: dict[str, Path], fmt: str) -> None:
    runs = []
    for precopy in (0, 1):
        llm = LLM(checkpoints["olmoe"], device="cpu", num_slots=3, host_memory="1GiB", decode="static", compile=False,
                  expert_dtype=fmt if fmt != "bf16" else "auto", progress=False)  # fmt: skip
        assert llm.static is not None and llm.static.table.zero_copy
        llm.static.blocks = {"PRECOPY": precopy}
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        p, s = llm.policy.stats, llm.store.stats
        runs.append((out.token_ids, p.hits, p.misses, s.bytes_zero_copy, llm.policy.slot_layer.tolist(),
                     llm.policy.slot_expert.tolist(), llm.store.slots.clone()))  # fmt: skip
    *first, pool = runs[0]
    *second, pool2 = runs[1]
    assert first == second
    assert torch.equal(
        pool, pool2
    )  # every slot holds the same bytes: the claimed misses were written either way
    assert first[2] > 0  # misses happened, so claimed slots were filled (by the kernel, or by the copy first)
