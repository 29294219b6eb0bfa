"""Per-family facts: how each supported architecture names its expert tensors on disk.

transformers keeps each MoE layer's experts as 3-D parameters (``gate_up_proj`` [E, ...], ``down_proj`` [E, ...],
optional biases); checkpoints store them either the same way ("fused", e.g. gpt-oss) or one tensor per expert
(Mixtral's ``w1/w3/w2``, the Qwen/OLMoE/DeepSeek ``gate_proj/up_proj/down_proj``). One row per family says how to
assemble one expert's slice of each parameter from per-expert tensors, and how dense names differ on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """How one architecture family stores its experts."""

    name: str
    expert_parts: dict[str, tuple[str, ...]]
    """Model parameter of the experts module -> per-expert checkpoint suffixes, concatenated on dim 0, relative to
    ``<experts path>.<e>.``. Empty: the family stores fused 3-D tensors only."""
    renames: tuple[tuple[str, str], ...] = ()
    """(substring in the model's parameter name, substring on disk) for names that differ (e.g. Mixtral's MoE block)."""


_GATE_UP_DOWN = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "mixtral",
        {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)},
        renames=((".mlp.", ".block_sparse_moe."),),
    ),
    "qwen2_moe": Family("qwen2_moe", _GATE_UP_DOWN),
    "qwen3_moe": Family("qwen3_moe", _GATE_UP_DOWN),
    "olmoe": Family("olmoe", _GATE_UP_DOWN),
    "deepseek_v2": Family("deepseek_v2", _GATE_UP_DOWN),
    "deepseek_v3": Family("deepseek_v3", _GATE_UP_DOWN),
    "gpt_oss": Family("gpt_oss", {}),
}


def family_for(model_type: str) -> Family:
    """The family row for a config's ``model_type``; a clear error for anything else."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; moeflow runs {', '.join(sorted(FAMILIES))}. "
            "For a dense model use transformers directly; for another MoE family, open an issue with its config.json"
        ) from None


def disk_names(family: Family, model_name: str) -> list[str]:
    """Candidate on-disk names of a model parameter, the model's own name first."""
    names = [model_name]
    for model_part, disk_part in family.renames:
        if model_part in model_name:
            names.append(model_name.replace(model_part, disk_part))
    return names
