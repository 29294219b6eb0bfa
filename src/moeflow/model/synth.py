"""Random-weight Hugging Face checkpoints with the exact geometry of real MoE models, for replay benchmarks.

``synthesize("olmoe" | "qwen3-30b" | "mixtral", out)`` writes ``config.json`` (the family's transformers config
class, ``save_pretrained``), then streams tensors shard by shard (about 2 GB each) with
``safetensors.torch.save_file`` and finally ``model.safetensors.index.json``; the whole model is never in memory.
Tensor names are the checkpoint's own on-disk names (per-expert tensors, as ``save_pretrained`` writes them for
the family): the model's parameter list comes from an instance on the meta device (no memory), and its fused 3-D
expert parameters are spelled out per expert. Weights are N(0, 0.02); norm weights are ones. No tokenizer is
written: drive such a checkpoint with token ids (or replayed traces).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, PretrainedConfig, Qwen3MoeConfig

from moeflow.config import format_size
from moeflow.errors import MoeflowError

SHARD_BYTES = 2 * 1000**3
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def olmoe_config() -> PretrainedConfig:
    """OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 16 layers, 64 experts top-8."""
    return OlmoeConfig(
        architectures=["OlmoeForCausalLM"],
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=50279,
        tie_word_embeddings=False,
    )


def qwen3_30b_config() -> PretrainedConfig:
    """Qwen3-30B-A3B: 48 layers, 128 experts top-8, every layer sparse."""
    return Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    )


def mixtral_config() -> PretrainedConfig:
    """Mixtral-8x7B: 32 layers, 8 experts top-2."""
    return MixtralConfig(
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        num_local_experts=8,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


LIKE: dict[str, Callable[[], PretrainedConfig]] = {
    "olmoe": olmoe_config,
    "qwen3-30b": qwen3_30b_config,
    "mixtral": mixtral_config,
}

# Per-expert on-disk names of the fused expert parameters, per model_type: fused name -> per-expert suffixes
# (split evenly along dim 0 of one expert's slice), and (in-model, on-disk) substrings that differ.
_GATE_UP_DOWN = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}
EXPERT_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "olmoe": _GATE_UP_DOWN,
    "qwen3_moe": _GATE_UP_DOWN,
    "mixtral": {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)},
}
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: on-disk name, shape, and whether it is a norm weight (ones)."""

    name: str
    shape: tuple[int, ...]
    ones: bool = False

    def nbytes(self, dtype: torch.dtype) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtype.itemsize


def synth_config(like: str, num_layers: int | None = None, dtype: str = "bfloat16") -> PretrainedConfig:
    """The config of a real family's geometry, optionally truncated to ``num_layers`` layers."""
    if like not in LIKE:
        raise MoeflowError(f"unknown --like {like!r}: choose one of {', '.join(LIKE)}")
    config = LIKE[like]()
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    config.dtype = dtype
    return config


def _expert_intermediate(config: PretrainedConfig) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def _num_experts(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def _per_expert(config: PretrainedConfig, name: str) -> list[TensorSpec] | None:
    """Per-expert specs for a fused expert parameter ``...experts.<fused>``; None for other parameters."""
    prefix, _, fused = name.rpartition(".")
    parts = EXPERT_NAMES.get(config.model_type, {}).get(fused)
    if parts is None or not prefix.endswith("experts"):
        return None
    hidden, inter = config.hidden_size, _expert_intermediate(config)
    shape = (hidden, inter) if fused == "down_proj" else (inter, hidden)  # one part of one expert
    return [TensorSpec(f"{prefix}.{e}.{part}", shape) for e in range(_num_experts(config)) for part in parts]


def _rename(model_type: str, name: str) -> str:
    for in_model, on_disk in RENAMES.get(model_type, ()):
        name = name.replace(in_model, on_disk)
    return name


def tensor_specs(config: PretrainedConfig) -> list[TensorSpec]:
    """Every tensor the checkpoint holds, in model order, with on-disk names (nothing is allocated)."""
    if config.model_type not in EXPERT_NAMES:
        raise MoeflowError(f"synth knows {', '.join(EXPERT_NAMES)} checkpoints, not {config.model_type!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    specs: list[TensorSpec] = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        expanded = _per_expert(config, name)
        if expanded is None:
            expanded = [TensorSpec(name, tuple(tensor.shape), ones=tensor.dim() == 1 and "norm" in name)]
        specs.extend(TensorSpec(_rename(config.model_type, s.name), s.shape, s.ones) for s in expanded)
    return specs


def plan_shards(
    specs: list[TensorSpec], dtype: torch.dtype, shard_bytes: int = SHARD_BYTES
) -> list[list[TensorSpec]]:
    """Consecutive groups of at most ``shard_bytes`` (a larger single tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def check_free_space(out: Path, needed: int) -> None:
    """Raise before writing anything when the file system holding ``out`` lacks ``needed`` bytes (+1%)."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.01:
        raise MoeflowError(
            f"the checkpoint needs {format_size(needed)} but {probe} has only {format_size(free)} free: "
            "pick --out on a larger disk, or write fewer layers with --layers N"
        )


def _file_mode() -> int:
    """0666 less the process umask (what an ordinary file write gets)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _make(spec: TensorSpec, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Draw on the generator's device (a GPU draws gigabytes in milliseconds), return on the CPU."""
    if spec.ones:
        return torch.ones(spec.shape, dtype=dtype)
    out = torch.empty(spec.shape, dtype=dtype, device=gen.device).normal_(0.0, 0.02, generator=gen)
    return out.cpu()


def write_checkpoint(
    config: PretrainedConfig,
    out: str | Path,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write ``config`` with random weights into the empty or new directory ``out``; returns ``out``.
    The index file is written last, so an interrupted run leaves a checkpoint loaders reject."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MoeflowError(f"{out} is not empty: pass a new or empty directory to --out")
    dtype = DTYPES[str(config.dtype).removeprefix("torch.")]
    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype, shard_bytes)
    total = sum(s.nbytes(dtype) for s in specs)
    check_free_space(out, total)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    weight_map: dict[str, str] = {}
    mode = _file_mode()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {out.name}", disable=not progress) as bar:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            bar.set_postfix_str(f"shard {i}/{len(shards)}")
            tensors = {spec.name: _make(spec, dtype, gen) for spec in shard}
            save_file(tensors, out / fname, metadata={"format": "pt"})
            os.chmod(out / fname, mode)  # safetensors creates 0600 files; make them like config.json
            weight_map.update(dict.fromkeys(tensors, fname))
            bar.update(sum(spec.nbytes(dtype) for spec in shard))
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def synthesize(
    like: str, out: str | Path, num_layers: int | None = None, dtype: str = "bfloat16", seed: int = 0
) -> Path:
    """A random-weight checkpoint of ``like``'s real geometry in ``out`` (see the module docstring)."""
    if dtype not in DTYPES:
        raise MoeflowError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return write_checkpoint(synth_config(like, num_layers, dtype), out, seed)
