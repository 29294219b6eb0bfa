"""What moeflow derived about a checkpoint, as ``moeflow info`` shows it: MoE layers, experts, top-k, sizes, shared
experts (kept in the dense part), and how each expert parameter is assembled from the checkpoint's tensors."""

from __future__ import annotations

import re
from typing import Any

from moeflow.model.loader import LoadedModel

SHARED = re.compile(r"shared", re.I)


def shared_experts(lm: LoadedModel) -> list[str]:
    """Submodules of the first MoE block that are shared experts (run densely for every token, by transformers)."""
    block_path = lm.layers[0].path.rpartition(".")[0]
    block = lm.model.get_submodule(block_path) if block_path else lm.model
    return [name for name, _ in block.named_children() if SHARED.search(name)]


def expert_sources(lm: LoadedModel) -> dict[str, str]:
    """Expert parameter -> where expert {e} of the first MoE layer comes from on disk, and how it is fused."""
    out = {}
    layer = lm.layers[0]
    for p in lm.layout.params:
        source = lm.weights.sources[f"{layer.path}.{p.name}"]
        keys = []
        for names in source.parts.values():
            if len(names) == lm.num_experts > 1:
                keys.append(_expert_pattern(names[0], names[1]))
            else:
                keys.append(f"{names[0]}[e]")
        ops = [type(op).__name__ for op in source.converter.operations] if source.converter else []
        out[p.name] = " + ".join(keys) + (f"  [{', '.join(ops)}]" if ops else "")
    return out


def _expert_pattern(first: str, second: str) -> str:
    """The disk key of experts 0 and 1 with the part that differs (the expert index) shown as ``{e}``."""
    a, b = first.split("."), second.split(".")
    return ".".join("{e}" if x != y else x for x, y in zip(a, b)) if len(a) == len(b) else first


def describe(lm: LoadedModel) -> dict[str, Any]:
    """The facts ``moeflow info`` prints (and ``--json`` emits)."""
    total = len(lm.layers) * lm.num_experts
    return {
        "architecture": type(lm.model).__name__,
        "model_type": lm.config.model_type,
        "moe_layers": len(lm.layers),
        "moe_layer_ids": [layer.layer_id for layer in lm.layers],
        "experts_per_layer": lm.num_experts,
        "top_k": lm.top_k,
        "shared_experts": shared_experts(lm),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "bytes_per_expert": lm.expert_bytes,
        "expert_bytes_total": lm.expert_bytes * total,
        "dense_bytes": lm.dense_bytes,
        "expert_tensors": expert_sources(lm),
    }
