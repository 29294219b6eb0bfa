"""The store's quantised tiers: every expert quantised once into the host pool (``preload_quantised``), the
miss-only low-precision copies (``--miss-dtype``, ``low_copies``), and the weights an eager layer computes with
when slots hold quantised rows or a miss computes with its low-precision copy (``compute_views``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from moeflow.experts.cache import Key
from moeflow.model.loader import LoadedModel
from moeflow.model.rows import read_rows

if TYPE_CHECKING:
    from moeflow.experts.store import ExpertStore


def preload_quantised(
    loaded: LoadedModel, host: torch.Tensor, host_row: OrderedDict[Key, int], progress: bool
) -> int:
    """Every expert quantised once into ``host`` (row l*E+e), a layer at a time (the fit runs over a layer's
    experts together, in chunks, on the model's GPU when it has one); returns the bytes read from disk."""
    codec = loaded.codecs.host
    num_experts, experts = loaded.num_experts, list(range(loaded.num_experts))
    name = codec.fmt.name if codec is not None else ""
    where = " (fit on the GPU)" if loaded.device.type == "cuda" else ""
    read = 0
    for layer in tqdm(range(len(loaded.layers)), desc=f"experts -> {name} in host RAM{where}", unit="layer",
                      disable=not progress, leave=False):  # fmt: skip
        first = layer * num_experts
        read += read_rows(loaded, layer, experts, host[first : first + num_experts], codec)
        host_row.update(((layer, e), first + e) for e in experts)
    if where:
        torch.cuda.empty_cache()  # the fit's temporaries: give them back before the KV cache and graphs are sized
    return read


def low_copies(loaded: LoadedModel, total: int, pinned: bool, progress: bool) -> torch.Tensor | None:
    """[L*E, row] every expert's low-precision copy (row l*E+e), or None without ``--miss-dtype``."""
    codec = loaded.codecs.low
    if codec is None:
        return None
    low = torch.empty(total, codec.nbytes, dtype=torch.uint8, pin_memory=pinned)
    num_experts, experts = loaded.num_experts, list(range(loaded.num_experts))
    for layer in tqdm(range(len(loaded.layers)), desc=f"experts -> {codec.fmt.name} miss copies",
                      unit="layer", disable=not progress, leave=False):  # fmt: skip
        read_rows(loaded, layer, experts, low[layer * num_experts : (layer + 1) * num_experts], codec)
    return low


def compute_views(
    store: ExpertStore, slots: list[int], missed: dict[int, Key]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Weights to compute ``slots`` with, and the index of each slot in them: the slot pool's own views, or for
    quantised slots their rows dequantised; with a miss copy, the slots in ``missed`` (slot -> key just loaded)
    compute with their expert's dequantised low-precision copy instead of the full one."""
    loaded, dev = store.loaded, store.device
    if store.codec is not None:
        rows = store.codec.decode(store.slots[torch.tensor(slots, device=dev)], loaded.dtype)
    elif store.low is not None and store.low_codec is not None and missed:
        rows = store.slots[torch.tensor(slots, device=dev)]  # a copy: the slots keep the full experts
        pos = [i for i, s in enumerate(slots) if s in missed]
        num_experts = loaded.num_experts
        keys = [missed[slots[i]][0] * num_experts + missed[slots[i]][1] for i in pos]
        low = store.low[torch.tensor(keys)].to(dev, non_blocking=True)
        rows[torch.tensor(pos, device=dev)] = store.low_codec.decode(low, loaded.dtype)
    else:
        return store.views, slots
    return loaded.layout.views(rows), list(range(len(slots)))
