"""The bookkeeping of one MoE layer in a static decode step, in NumPy: the rule the device follows (the Triton
route kernel in ``route_kernel.py`` on a GPU), run here for the CPU path and by the simulator.

The layer's pairs are grouped by expert; each used expert is served from its slot (a hit) or from host memory (a
miss); misses, in expert order, claim the first candidate slots not yet taken whose key the step cannot read again:
a free slot, a key of a layer that already ran in this step and did not use it, or a key of this layer that no
token routed to. Legend: T tokens, K top-k, P = T*K pairs, E experts, L layers, C candidates.
"""

from __future__ import annotations

import numpy as np


def route_layer(
    ids: np.ndarray,  # [T, K] expert ids
    live: np.ndarray | None,  # [T] bool: rows that count (None: all)
    table_row: np.ndarray,  # [E] slot of each expert of the layer, -1 when not resident
    cand: np.ndarray,  # [3, C] candidate slots, their keys' layer and expert (layer -1: free; slot -1: padding)
    taken: np.ndarray,  # [>= C] bool, updated: candidates claimed so far in the step
    served: np.ndarray,  # [L, E] int8, row ``layer`` written: 0 unused, 1 hit, 2 miss
    filled: np.ndarray,  # [L, E] int32, row ``layer`` written: the claimed slot of each miss, -1 none
    layer: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order [P], counts [E], starts [E], claim [E]): pairs sorted by expert (stable), pairs per expert, first index
    of each expert's pairs in ``order``, and the slot each missed expert is written into (-1: none)."""
    k = ids.shape[1]
    num_experts = table_row.shape[0]
    flat = ids.reshape(-1).astype(np.int64)
    if live is not None:  # pairs of finished rows go to a bucket past the last expert
        flat = np.where(np.repeat(live.astype(bool), k), flat, num_experts)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    counts = np.bincount(flat, minlength=num_experts + 1)[:num_experts].astype(np.int32)
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    used = counts > 0
    miss = used & (table_row < 0)
    served[layer] = np.where(used, np.where(table_row >= 0, 1, 2), 0)
    c_slot, c_layer, c_expert = (cand[i].astype(np.int64) for i in range(3))
    n = c_slot.shape[0]
    ran = (c_layer >= 0) & (c_layer <= layer)
    unused = served[np.maximum(c_layer, 0), np.maximum(c_expert, 0)] == 0
    ok = ((c_layer < 0) | (ran & unused)) & (c_slot >= 0) & ~taken[:n]
    free = np.flatnonzero(ok)  # candidate indices in order
    misses = np.flatnonzero(miss)  # expert ids in order
    got = min(len(free), len(misses))
    claim = np.full(num_experts, -1, np.int32)
    claim[misses[:got]] = c_slot[free[:got]]
    taken[free[:got]] = True
    filled[layer] = claim
    return order, counts, starts, claim
