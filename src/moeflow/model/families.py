"""Which architectures moeflow runs: those whose experts module goes through transformers' experts interface.

transformers marks an experts module with ``@use_experts_implementation``: its ``forward`` then dispatches through
an :class:`~transformers.integrations.moe.ExpertsInterface`, which is where moeflow registers itself. This module
detects that (on a class, so the installed transformers can be surveyed without building models, and on a built
model, to find its MoE layers), finds each MoE layer's top-k, and explains the refusal of any other family.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from torch import nn
from transformers.integrations.moe import ExpertsInterface

from moeflow.errors import UnsupportedModelError

TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "topk", "moe_topk")
"""Attribute names under which a MoE block or its router keeps the number of experts per token."""


def uses_experts_interface(cls: type) -> bool:
    """The class's own ``forward`` is transformers' dispatching wrapper (it closes over an ExpertsInterface)."""
    forward = cls.__dict__.get("forward")
    if not inspect.isfunction(forward) or not forward.__closure__:
        return False
    return any(_holds_interface(cell) for cell in forward.__closure__)


def _holds_interface(cell: object) -> bool:
    try:
        return isinstance(cell.cell_contents, ExpertsInterface)  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return False


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every experts module of ``model`` that dispatches through the experts interface."""
    return [
        (p, m) for p, m in model.named_modules() if any(uses_experts_interface(c) for c in type(m).__mro__)
    ]


def top_k_of(model: nn.Module, experts_path: str) -> int:
    """Experts per token of the MoE block holding ``experts_path``: the block's or its router's attribute."""
    block_path = experts_path.rpartition(".")[0]
    block = model.get_submodule(block_path) if block_path else model
    for module in (block, *block.children()):
        for attr in TOP_K_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in TOP_K_ATTRIBUTES:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"cannot tell how many experts per token {block_path} routes to")


def refusal(model_type: str, model: nn.Module) -> UnsupportedModelError:
    """The error for a model with no experts-interface module: what its experts are, and why moeflow cannot run them."""
    names = sorted({type(m).__name__ for p, m in model.named_modules() if p.rsplit(".", 1)[-1] == "experts"})
    moe_like = names or sorted(
        {type(m).__name__ for _, m in model.named_modules() if "MoE" in type(m).__name__}
    )
    if isinstance(model, nn.Module) and any(
        isinstance(m, nn.ModuleList | nn.ModuleDict)
        for p, m in model.named_modules()
        if p.endswith("experts")
    ):
        why = (
            "its experts are a list of separate MLP modules (as in Switch/NLLB-MoE), not 3-D fused parameters"
        )
    elif moe_like:
        why = f"its experts ({', '.join(moe_like)}) use their own layout, outside transformers' experts interface"
    else:
        why = "it has no MoE layers (a dense model: use transformers directly)"
    return UnsupportedModelError(
        f"model type {model_type!r} is not supported: {why}. moeflow runs every family whose experts module uses "
        "transformers' experts interface (@use_experts_implementation); see `moeflow info` and the README's list"
    )


def interface_model_types() -> list[str]:
    """Model types of the installed transformers with a causal-LM class whose modeling module defines an experts
    class that uses the experts interface (the modeling source is read first; only candidates are imported)."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        path = root / module / f"modeling_{module}.py"
        if not path.is_file() or "use_experts_implementation" not in path.read_text():
            continue
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        if any(inspect.isclass(c) and uses_experts_interface(c) for c in vars(modeling).values()):
            found.append(model_type)
    return found
