"""Registers moeflow's experts function in transformers' ExpertsInterface (its extension point for experts).

A model built with ``experts_implementation="moeflow"`` calls :func:`moeflow_experts_forward` from every experts
module; it hands the work to the module's ``moeflow`` handler, attached per model by the engine.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

IMPLEMENTATION = "moeflow"


def moeflow_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The function transformers dispatches to for ``experts_implementation="moeflow"``."""
    handler = getattr(self, "moeflow", None)
    if handler is None:
        raise RuntimeError("this experts module was not prepared by moeflow (no `moeflow` handler attached)")
    return handler(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moeflow_experts_forward)
