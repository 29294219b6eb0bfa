"""The slot-table experts' two device operations as torch custom ops, so ``torch.compile`` can trace a whole decode
step through them (one graph, no graph break per layer) while the kernels themselves stay opaque.

- ``moeflow::route``: group a layer's (token, expert) pairs by expert and claim candidate slots for its misses
  (``claims.route_layer``'s rule): the Triton kernel of ``route_kernel.py`` on CUDA, NumPy on the CPU.
- ``moeflow::slot_linear``: one projection for every routed pair, reading each expert's weights from its slot or
  from the host pool, writing a missed expert into its claimed slot as it is read (read-through fill): the Triton
  kernel of ``slot_kernel.py`` on CUDA, a torch loop over the used experts on the CPU.
- ``moeflow::fill_claimed``: with the option ``PRECOPY``, a layer's claimed misses copied into their slots ahead of
  the projections (``precopy.py`` on CUDA, row copies on the CPU).
- ``moeflow::slot_linear_quant``: the same over quantised rows (uint8 pools, ``quant_proj.QuantProj``): the Triton
  kernel of ``slot_kernel_quant.py`` on CUDA; on the CPU each row dequantised and the same torch reference.

The fill writes only slots whose keys the step never reads again (the claim rule), so no other operation of the step
depends on it: the pool's mutation is deliberately not declared to the compiler (declaring it would make the
compiler copy the whole pool). Legend: T tokens, K top-k, E experts, C candidates, P = T*K pairs, N out, D in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moeflow.experts.claims import route_layer
from moeflow.experts.quant_proj import QuantProj, project_quant

BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages", "COMPACT")
"""The kernel options ``slot_linear`` and ``slot_linear_quant`` take as a list of ints (a custom op takes no dicts),
in this order; -1 (or an empty list) keeps the kernel's own default (``slot_kernel.BLOCKS``,
``slot_kernel_quant.BLOCKS``). One list serves both kernels; the quantised one refuses a tile its format cannot run."""


@torch.library.custom_op("moeflow::route", mutates_args=("taken", "served", "filled", "scratch"))
def route(
    ids: torch.Tensor,  # [T, K]
    live: torch.Tensor | None,  # [T] bool (None: every row)
    table_row: torch.Tensor,  # [E] int32
    cand: torch.Tensor,  # [3, C] int32
    taken: torch.Tensor,  # [C + 1] bool
    served: torch.Tensor,  # [L, E] int8
    filled: torch.Tensor,  # [L, E] int32
    scratch: torch.Tensor,  # [C] int32
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order [P], counts [E], starts [E], claim [E]), int32 (see ``claims.route_layer``)."""
    if ids.is_cuda:
        from moeflow.experts.route_kernel import route as kernel

        (order, counts, starts), claim = kernel(
            ids, live, table_row, cand, taken, served, filled, scratch, layer
        )
        return order, counts, starts, claim
    live_np = live.numpy() if live is not None else None
    out = route_layer(ids.numpy(), live_np, table_row.numpy(), cand.numpy(), taken.numpy(), served.numpy(),
                      filled.numpy(), layer)  # fmt: skip
    return tuple(torch.from_numpy(a) for a in out)  # type: ignore[return-value]


@route.register_fake
def _route_fake(
    ids: torch.Tensor, live: torch.Tensor | None, table_row: torch.Tensor, *rest: object
) -> tuple[torch.Tensor, ...]:
    e = table_row.shape[0]
    return (
        ids.new_empty(ids.numel(), dtype=torch.int32),
        *(ids.new_empty(e, dtype=torch.int32) for _ in range(3)),
    )


@torch.library.custom_op("moeflow::slot_linear", mutates_args=())
def slot_linear(
    x: torch.Tensor,  # [R, D] tokens (first projection) or pairs (second)
    order: torch.Tensor,  # [P]
    counts: torch.Tensor,  # [E]
    starts: torch.Tensor,  # [E]
    slot: torch.Tensor,  # [E] int32
    claim: torch.Tensor,  # [E] int32
    pool: torch.Tensor,  # [S, row]
    host: torch.Tensor,  # [L*E, row]
    host_row0: int,
    weight: list[int],  # (offset, stride along N, stride along D) inside an expert row
    bias_off: int,  # -1: no bias
    n: int,
    k: int,
    pair_rows: bool,
    fill: bool,
    blocks: list[int],  # BLOCK_KEYS values (-1: default), or empty
) -> torch.Tensor:  # [P, N]
    """y[pair] = x[row of pair] @ W_e.T (+ b_e) for every pair routed to a used expert e (zeros elsewhere for the
    second projection, undefined for the first)."""
    p = order.shape[0]
    make = torch.zeros if pair_rows else torch.empty
    y = make(p, n, dtype=x.dtype, device=x.device)
    bias = bias_off if bias_off >= 0 else None
    if x.is_cuda:
        from moeflow.experts.slot_kernel import slot_linear as kernel

        opts = {key: v for key, v in zip(BLOCK_KEYS, blocks, strict=False) if v >= 0}
        kernel(x, y, (order, counts, starts), slot, claim, pool, host, host_row0, tuple(weight), bias, k, pair_rows,
               fill, opts)  # fmt: skip
        return y
    for row, pairs in _used_rows(order, counts, starts, slot, claim, pool, host, host_row0, fill):
        y[pairs.long()] = project(row, x, pairs, weight, bias, n, k, pair_rows)
    return y


def _used_rows(
    order: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    slot: torch.Tensor,
    claim: torch.Tensor,
    pool: torch.Tensor,
    host: torch.Tensor,
    host_row0: int,
    fill: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The CPU path of both ops: (expert row, its pairs) for every used expert, read from its slot or the host
    pool, a missed expert written into its claimed slot first (the kernels' read-through fill)."""
    slots, claims = slot.tolist(), claim.tolist()
    for e, (cnt, start) in enumerate(zip(counts.tolist(), starts.tolist(), strict=True)):
        if cnt:
            row = pool[slots[e]] if slots[e] >= 0 else host[host_row0 + e]
            if fill and claims[e] >= 0:
                pool[claims[e]].copy_(row)
            yield row, order[start : start + cnt]


@torch.library.custom_op("moeflow::fill_claimed", mutates_args=())
def fill_claimed(
    counts: torch.Tensor,  # [E] int32
    slot: torch.Tensor,  # [E] int32 the layer's slot row
    claim: torch.Tensor,  # [E] int32
    pool: torch.Tensor,  # [S, row]
    host: torch.Tensor,  # [L*E, row]
    host_row0: int,
) -> torch.Tensor:  # [E] int32
    """Copy every used, missed expert with a claimed slot into it (``precopy.py``); returns the slot row with those
    experts at their claimed slots, for the projections to read them as hits. The pool's mutation is not declared,
    as the fill's is not (above): the slot written is one the step cannot read again."""
    moved = (counts > 0) & (slot < 0) & (claim >= 0)
    if counts.is_cuda:
        from moeflow.experts.precopy import fill_claimed as kernel

        kernel(counts, slot, claim, pool, host, host_row0)
    else:
        for e in torch.nonzero(moved).flatten().tolist():
            pool[int(claim[e])].copy_(host[host_row0 + e])
    return torch.where(moved, claim, slot)


@fill_claimed.register_fake
def _fill_claimed_fake(counts: torch.Tensor, slot: torch.Tensor, *rest: object) -> torch.Tensor:
    return torch.empty_like(slot)


@slot_linear.register_fake
def _slot_linear_fake(x: torch.Tensor, order: torch.Tensor, *rest: object) -> torch.Tensor:
    n = rest[
        9
    ]  # the output width, after counts, starts, slot, claim, pool, host, host_row0, weight, bias_off
    assert isinstance(n, int)
    return x.new_empty(order.shape[0], n)


def project(
    row: torch.Tensor,  # [row] one expert's flat weights
    x: torch.Tensor,  # [R, D]
    pairs: torch.Tensor,  # [M] pair ids of this expert
    weight: list[int] | tuple[int, ...],
    bias: int | None,
    n: int,
    k: int,
    pair_rows: bool,
) -> torch.Tensor:  # [M, N]
    """One expert's projection of its pairs' inputs (the torch reference of the kernel's inner loop)."""
    off, swn, swd = weight
    d = x.shape[1]
    w = row.as_strided((n, d), (swn, swd), row.storage_offset() + off)  # [N, D]
    rows = pairs.long() if pair_rows else pairs.long() // k
    y = x[rows] @ w.T
    return y + row[bias : bias + n] if bias is not None else y


@torch.library.custom_op("moeflow::slot_linear_quant", mutates_args=())
def slot_linear_quant(
    x: torch.Tensor,  # [R, D]
    order: torch.Tensor,  # [P]
    counts: torch.Tensor,  # [E]
    starts: torch.Tensor,  # [E]
    slot: torch.Tensor,  # [E] int32
    claim: torch.Tensor,  # [E] int32
    pool: torch.Tensor,  # [S, nbytes] uint8
    host: torch.Tensor,  # [L*E, nbytes] uint8
    host_row0: int,
    quant: list[int],  # QuantProj.as_list(): where the weight's codes and scales sit in a row
    bias_off: int,  # byte offset of a raw float32 bias; -1: no bias
    k: int,
    pair_rows: bool,
    fill: bool,
    blocks: list[int],  # BLOCK_KEYS values (-1: default), or empty
) -> torch.Tensor:  # [P, N]
    """``slot_linear`` over quantised rows: the weight dequantised from each expert's row (a fill copies the raw
    quantised bytes)."""
    q = QuantProj.of_list(quant)
    make = torch.zeros if pair_rows else torch.empty
    y = make(order.shape[0], q.n, dtype=x.dtype, device=x.device)
    bias = bias_off if bias_off >= 0 else None
    if x.is_cuda:
        from moeflow.experts.slot_kernel_quant import slot_linear_quant as kernel

        opts = {key: v for key, v in zip(BLOCK_KEYS, blocks, strict=False) if v >= 0}
        kernel(x, y, (order, counts, starts), slot, claim, pool, host, host_row0, q, bias, k, pair_rows, fill,
               opts)  # fmt: skip
        return y
    for row, pairs in _used_rows(order, counts, starts, slot, claim, pool, host, host_row0, fill):
        y[pairs.long()] = project_quant(row, x, pairs, q, bias, k, pair_rows)
    return y


@slot_linear_quant.register_fake
def _slot_linear_quant_fake(x: torch.Tensor, order: torch.Tensor, *rest: object) -> torch.Tensor:
    quant = rest[7]  # after counts, starts, slot, claim, pool, host, host_row0
    assert isinstance(quant, list)
    return x.new_empty(order.shape[0], QuantProj.of_list(quant).n)
