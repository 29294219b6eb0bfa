"""Byte counts of a Hugging Face MoE checkpoint read from its safetensors headers (no weights loaded): the dense
weights, the routed experts, and the layer count, which fix what a GPU budget of "dense + a fraction of the
experts" is in bytes for every peer alike; and, from the config, how many KV-cache values one token adds."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckpointSizes:
    layers: int
    num_experts: int
    dense_bytes: int
    expert_bytes_total: int
    kv_values_per_token: int = 0
    """Keys and values one token adds to the KV cache over every layer (2 x layers x KV heads x head size)."""

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert of one layer."""
        return self.expert_bytes_total // (self.layers * self.num_experts)

    def budget(self, fraction: float) -> int:
        """GPU bytes for the dense weights plus ``fraction`` of the experts."""
        return self.dense_bytes + int(fraction * self.expert_bytes_total)


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_sizes(model: Path) -> CheckpointSizes:
    config = json.loads((model / "config.json").read_text())
    config = config.get("text_config", config)
    experts = config.get("num_experts") or config.get("num_local_experts") or config["n_routed_experts"]
    dense = routed = 0
    for shard in sorted(model.glob("*.safetensors")):
        for name, meta in _header(shard).items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            if ".experts." in name and "shared" not in name:
                routed += end - start
            else:
                dense += end - start
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = 2 * layers * int(config.get("num_key_value_heads") or heads) * int(head_dim)
    return CheckpointSizes(layers, int(experts), dense, routed, kv)
