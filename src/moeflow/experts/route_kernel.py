"""One launch per MoE layer for the slot-table experts' bookkeeping (Triton, CUDA): the work of
``slot_experts.group_pairs`` in a single program, instead of some twenty small torch kernels.

It sorts the layer's pairs by expert (stable), counts them, marks each used expert served from its slot or from
host memory, and claims candidate slots for the misses by the rule of ``slot_experts._claim``: in expert order, the
first candidates not taken whose key the step cannot read again. Legend: P pairs, E experts, C candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route(
    ids_ptr,  # [P] expert of each pair, token-major
    live_ptr,  # [T] rows that count (HAS_LIVE)
    table_ptr,  # [E] this layer's slot row
    cand_ptr,  # [3, C] candidate slot, its key's layer, its key's expert
    taken_ptr,  # [C + 1] candidates claimed so far in the step
    served_ptr,  # [L, E] int8
    filled_ptr,  # [L, E] int32
    scratch_ptr,  # [C] int32: candidate index by rank
    order_ptr,  # out [P]
    counts_ptr,  # out [E]
    starts_ptr,  # out [E]
    claim_ptr,  # out [E]
    P,
    K,
    E,
    C,
    layer,
    HAS_LIVE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_p = tl.arange(0, BLOCK_P)
    pm = offs_p < P
    ids = tl.load(ids_ptr + offs_p, mask=pm, other=0).to(tl.int32)
    valid = pm
    if HAS_LIVE:
        valid = valid & (tl.load(live_ptr + offs_p // K, mask=pm, other=0) != 0)
    key = tl.where(valid, ids, E)  # dropped pairs sort last, in a bucket past the experts
    key = tl.where(pm, key, BLOCK_E - 1)
    order = tl.sort(key * BLOCK_P + offs_p) % BLOCK_P
    tl.store(order_ptr + offs_p, order, mask=pm)
    counts = tl.histogram(key, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    em = offs_e < E
    counts = tl.where(em, counts, 0)
    tl.store(counts_ptr + offs_e, counts, mask=em)
    tl.store(starts_ptr + offs_e, tl.cumsum(counts, 0) - counts, mask=em)
    slot = tl.load(table_ptr + offs_e, mask=em, other=0)
    used = counts > 0
    miss = used & (slot < 0)
    tl.store(
        served_ptr + layer * E + offs_e, tl.where(used, tl.where(slot >= 0, 1, 2), 0).to(tl.int8), mask=em
    )
    tl.debug_barrier()  # this layer's served row is read back below
    offs_c = tl.arange(0, BLOCK_C)
    cm = offs_c < C
    c_slot = tl.load(cand_ptr + offs_c, mask=cm, other=-1)
    c_layer = tl.load(cand_ptr + C + offs_c, mask=cm, other=-1)
    c_exp = tl.load(cand_ptr + 2 * C + offs_c, mask=cm, other=-1)
    taken = tl.load(taken_ptr + offs_c, mask=cm, other=1) != 0
    ran = (c_layer >= 0) & (c_layer <= layer)
    c_used = tl.load(served_ptr + tl.maximum(c_layer, 0) * E + tl.maximum(c_exp, 0), mask=cm & ran, other=0)
    ok = ((c_layer < 0) | (ran & (c_used == 0))) & (c_slot >= 0) & ~taken & cm
    ok_rank = tl.cumsum(ok.to(tl.int32), 0) - 1
    tl.store(scratch_ptr + ok_rank, offs_c, mask=ok)
    tl.debug_barrier()
    n_ok = tl.sum(ok.to(tl.int32), 0)
    miss_rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    got = miss & (miss_rank < n_ok)
    pick = tl.load(scratch_ptr + miss_rank, mask=got, other=0)
    claim = tl.where(got, tl.load(cand_ptr + pick, mask=got, other=-1), -1)
    tl.store(claim_ptr + offs_e, claim, mask=em)
    tl.store(filled_ptr + layer * E + offs_e, claim, mask=em)
    tl.store(taken_ptr + pick, tl.full((BLOCK_E,), 1, tl.int1).to(taken_ptr.dtype.element_ty), mask=got)


def route(
    ids: torch.Tensor,  # [T, K]
    live: torch.Tensor | None,  # [T] bool
    table_row: torch.Tensor,  # [E] int32
    cand: torch.Tensor,  # [3, C] int32
    taken: torch.Tensor,  # [C + 1] bool
    served: torch.Tensor,  # [L, E] int8
    filled: torch.Tensor,  # [L, E] int32
    scratch: torch.Tensor,  # [C] int32
    layer: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """((order [P], counts [E], starts [E]), claim [E]) as ``slot_experts.group_pairs`` computes them."""
    t, k = ids.shape
    p, e, c = t * k, table_row.shape[0], cand.shape[1]
    dev = ids.device
    order = torch.empty(p, dtype=torch.int32, device=dev)
    counts, starts, claim = (torch.empty(e, dtype=torch.int32, device=dev) for _ in range(3))
    _route[(1,)](
        ids.reshape(-1), live if live is not None else ids, table_row, cand, taken, served, filled, scratch,
        order, counts, starts, claim, p, k, e, c, layer,
        HAS_LIVE=live is not None, BLOCK_P=triton.next_power_of_2(p), BLOCK_E=triton.next_power_of_2(e + 1),
        BLOCK_C=triton.next_power_of_2(c), num_warps=4,
    )  # fmt: skip
    return (order, counts, starts), claim
