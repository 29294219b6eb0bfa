"""The kernel stage of ``decode_floor.py`` (CUDA only): the tile options of the slot-table experts kernel timed
over every layer of a loaded engine, both projections in one CUDA graph, every expert read from its slot; the
full-precision kernel (``slot_kernel.py``) for bf16 experts, the quantised one (``slot_kernel_quant.py``) for
quantised rows. The fastest option per batch size is what the engine's steps then run (``static.blocks``)."""

from __future__ import annotations

import json

import torch

from benchmarks.common import graph_ms

VARIANTS = [
    {
        "BLOCK_N": 32,
        "BLOCK_D": 64,
        "num_warps": 2,
        "num_stages": 4,
    },  # the default before this kernel stage chose 64x128
    {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 2, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 16, "BLOCK_D": 256, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 32, "BLOCK_D": 256, "num_warps": 4, "num_stages": 3, "COMPACT": 1},
    {"BLOCK_N": 64, "BLOCK_D": 256, "num_warps": 8, "num_stages": 3, "COMPACT": 1},
    {"BLOCK_N": 16, "BLOCK_D": 128, "num_warps": 2, "num_stages": 6, "COMPACT": 1},
    {"BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 4, "COMPACT": 1},
]
"""Tile options of the full-precision kernel (bf16 experts)."""

QUANT_VARIANTS = [
    # slot_kernel_quant.BLOCKS until session 29
    {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 2, "num_stages": 4, "COMPACT": 0},
    {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    # slot_kernel_quant.BLOCKS since session 29 (the fastest int4 option in every run)
    {"BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 8, "num_stages": 4, "COMPACT": 1},
    {"BLOCK_N": 128, "BLOCK_D": 128, "num_warps": 8, "num_stages": 3, "COMPACT": 1},
]
"""Tile options of the quantised kernel: its former default, then 128-input D-tiles (at int4 a 64-input tile reads 32 bytes
per output row) with COMPACT, at 4 and 8 warps and up to 128 outputs. A D-tile within one int4 group (128) takes
the fast integer path (``slot_kernel_quant.fast``: no dequantisation per weight), so 8 warps and wider N-tiles may
pay now; the 256-wide D-tiles of the former list (3-20x slower for int4 and fp8 on the H200, session 21) are gone:
they span two int4 groups, so they would take the dequantising path anyway. Five, not a full grid, to keep the
``quant`` stage of gpu_decode_h200.sh within one device call (each option compiles both projections per dtype)."""


def kernel_stage(llm, batches: list[int], dtype: str = "bf16") -> tuple[dict[int, dict], list[dict]]:
    """Time both projections of the slot-table kernel over every layer, every expert read from its slot, inside a
    CUDA graph, for each tile option and batch size. A replay reads each layer's own experts (far more bytes than
    the L2 cache holds), as a decode step does, so the L2 cache does not flatter small tiles. Returns the fastest
    option per batch size and all rows (each with ``expert_dtype``). (Reads from host are bound by the link
    whatever the tiles: 50.5-51.2 GB/s for every option, decode-floor-h200-compile-in-timing.json.)"""
    from moeflow.experts.slot_experts import group_pairs

    t, lm, codec = llm.static.table.tensors, llm.loaded, llm.store.codec
    num_layers, e, k = len(lm.layers), lm.num_experts, lm.top_k
    project, (n1, d1, n2, d2), per_expert = _projector(t, lm, codec, k)
    saved = t.table.clone()
    keys = torch.arange(num_layers * e, dtype=torch.int32, device="cuda")
    t.table.copy_((keys % t.pool.shape[0]).view(num_layers, e))
    t.cand.fill_(-1)  # no fills: time the reads alone
    rows, best = [], {}
    for batch in batches:
        layers, distinct = [], 0
        for layer in range(num_layers):
            ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(batch)])
            layers.append(group_pairs(t, layer, ids, None))
            distinct += len(set(ids.flatten().tolist()))
        x = torch.randn(batch, d1, device="cuda").to(lm.dtype)
        h = torch.randn(batch * k, d2, device="cuda").to(lm.dtype)
        y1 = torch.empty(batch * k, n1, device="cuda", dtype=lm.dtype)
        y2 = torch.zeros(batch * k, n2, device="cuda", dtype=lm.dtype)
        nbytes = distinct * per_expert
        for v in VARIANTS if codec is None else QUANT_VARIANTS:
            head = {"expert_dtype": dtype, "batch": batch, **v}
            try:
                ms = graph_ms(lambda v=v, a=(layers, x, h, y1, y2): project(*a, v))
            except Exception as err:  # e.g. a tile that needs more shared memory than an SM has
                rows.append({**head, "error": f"{type(err).__name__}: {str(err)[:160]}"})
                continue
            rows.append({**head, "ms": ms, "GBps": nbytes / ms / 1e6, "layers": num_layers})
            print(json.dumps(rows[-1]), flush=True)
            if ms < best.get(batch, (float("inf"), {}))[0]:
                best[batch] = (ms, v)
    t.table.copy_(saved)
    return {b: v for b, (_, v) in best.items()}, rows


def _projector(t, lm, codec, k: int):
    """(the timed step over every layer, (N, D) of the first projection and of the second, bytes per expert)."""
    from moeflow.experts.quant_proj import quant_proj
    from moeflow.experts.slot_kernel import slot_linear
    from moeflow.experts.slot_kernel_quant import slot_linear_quant

    first = next(p for p in lm.layout.params if p.name == "gate_up_proj")
    down = next(p for p in lm.layout.params if p.name == "down_proj")
    (n1, d1), (n2, d2) = first.shape, down.shape
    if codec is None:

        def step(layers, x, h, y1, y2, v: dict) -> None:
            for groups, slot, claim in layers:
                slot_linear(x, y1, groups, slot, claim, t.pool, t.host, 0, (first.offset, d1, 1), None, k,
                            False, False, v)  # fmt: skip
                slot_linear(h, y2, groups, slot, claim, t.pool, t.host, 0, (down.offset, d2, 1), None, k,
                            True, False, v)  # fmt: skip

        return step, (n1, d1, n2, d2), (n1 * d1 + n2 * d2) * lm.dtype.itemsize
    q1, q2 = quant_proj(codec, "gate_up_proj"), quant_proj(codec, "down_proj")

    def step_quant(layers, x, h, y1, y2, v: dict) -> None:
        for groups, slot, claim in layers:
            slot_linear_quant(x, y1, groups, slot, claim, t.pool, t.host, 0, q1, None, k, False, False, v)
            slot_linear_quant(h, y2, groups, slot, claim, t.pool, t.host, 0, q2, None, k, True, False, v)

    nbytes = sum(p.nbytes for name in ("gate_up_proj", "down_proj") for p in codec.param(name).pieces)
    return step_quant, (n1, d1, n2, d2), nbytes
