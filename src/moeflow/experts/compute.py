"""Expert compute over the device slot pool.

transformers' own experts functions (eager loop, batched gather+bmm, grouped_mm) index ``self.gate_up_proj[e]``
etc. We hand them a :class:`SlotExperts` view whose parameters are the slot pool's views and whose "expert ids"
are slot ids, so the family's gating (``_apply_gate``: SiLU, gpt-oss's clamped SwiGLU, biases, transposed layouts)
comes from transformers unchanged. Legend: T tokens, K top-k, S slots, H hidden, I intermediate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.integrations import moe as hf_moe

ExpertsFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SlotExperts:
    """Stands in for a transformers experts module: slot-pool weights, the module's own gating and flags."""

    def __init__(self, module: nn.Module, views: dict[str, torch.Tensor]):
        self._module = module
        self._views = views
        self.num_experts = next(iter(views.values())).shape[0]  # S: slot ids play the expert ids
        self._is_expert_parallel = False

    def __getattr__(self, name: str) -> Any:
        views = self.__dict__["_views"]
        if name in views:
            return views[name]
        return getattr(self.__dict__["_module"], name)


def _eager(module: nn.Module) -> ExpertsFn:
    """The family's own loop: the module's ``forward`` (transformers' dispatcher) run on the proxy, whose config
    names the "eager" implementation, so the dispatcher calls the family's original code (no ``__wrapped__``)."""

    class EagerConfig:
        _experts_implementation = "eager"

        def __getattr__(self, name: str) -> Any:
            return getattr(module.config, name)

    forward = type(module).forward

    def run(proxy: Any, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        proxy.config = EagerConfig()
        return forward(proxy, hidden, index, weights)

    return run


SMALL_LAYER_PAIRS = 128
"""Up to this many (token, expert) pairs a layer is memory bound on its weights: read them once per pair (Triton
kernel, or gather + bmm). Beyond it (prefill), gathering weights per pair would copy too much."""

GATHER_BYTES = 128 * 2**20
"""The most weight bytes gather + bmm may copy for one layer (it copies every pair's expert): beyond it "auto"
computes without copies. The memory plan's KV reserve (at least ``memory.MIN_KV_RESERVE``) holds it."""

CPU_GATHER_BYTES = 32 * 2**20
"""``GATHER_BYTES`` on a CPU, where the copies are RSS beyond the budget and a per-expert loop costs no copies (small
experts, like the demo model's, still gather)."""

GROUPED_MAX_SLOTS = 1000
"""Slots one grouped_mm call spans (torch's grouped_mm refused 1024 groups on the H200: "Can't process more than
1024 groups"); a layer whose slots span more runs one call per window of slots."""


def auto_backend(pairs: int, expert_bytes: int, cuda: bool) -> str:
    """The "auto" choice for a layer of ``pairs`` routed pairs: gather + bmm when decode-sized and its copies stay
    within ``GATHER_BYTES``; else grouped_mm over the slot pool (each expert read once, no copies, as transformers'
    own default), except a decode-sized layer on a CPU, which runs the per-expert loop (``CPU_GATHER_BYTES`` bounds
    the gather there). On the 2-core CPU machine a prefill took 1.2-2.1x less time grouped than in the loop
    (``benchmarks/results/cpu-backends-*.json``, BENCHMARKS.md)."""
    if pairs <= SMALL_LAYER_PAIRS and pairs * expert_bytes <= (GATHER_BYTES if cuda else CPU_GATHER_BYTES):
        return "batched"
    return "grouped" if cuda or pairs > SMALL_LAYER_PAIRS else "loop"


def _grouped(
    module: nn.Module, views: dict[str, torch.Tensor], hidden: torch.Tensor, slot_index: torch.Tensor,
    weights: torch.Tensor, slots: list[int] | None,
) -> torch.Tensor:  # fmt: skip
    """transformers' grouped_mm over windows of at most ``GROUPED_MAX_SLOTS`` slots (``slots``: those in use, to
    span only their range); a pair outside the window is a sentinel id (the window's size), which grouped_mm skips."""
    size = next(iter(views.values())).shape[0]
    lo, hi = (min(slots), max(slots) + 1) if slots else (0, size)
    total: torch.Tensor | None = None
    for w0 in range(lo, hi, GROUPED_MAX_SLOTS):
        w1 = min(w0 + GROUPED_MAX_SLOTS, hi)
        proxy = SlotExperts(module, {name: v[w0:w1] for name, v in views.items()})
        index = slot_index - w0
        if (w0, w1) != (0, size):
            index = torch.where((slot_index >= w0) & (slot_index < w1), index, w1 - w0)
            proxy._is_expert_parallel = True  # transformers' flag for sentinel ids
        part = hf_moe.grouped_mm_experts_forward(proxy, hidden, index, weights)
        total = part if total is None else total + part
    assert total is not None
    return total


def run_experts(
    backend: str,
    module: nn.Module,
    views: dict[str, torch.Tensor],
    hidden: torch.Tensor,  # [T, H]
    slot_index: torch.Tensor,  # [T, K] slot of each chosen expert
    weights: torch.Tensor,  # [T, K]
    slots: list[int] | None = None,
) -> torch.Tensor:  # [T, H]
    """Combine the chosen experts' outputs for every token, computing on the slot pool (``slots``: the slots the
    pairs use, when the caller knows them; "auto": ``auto_backend``;
    on the H100 at decode batch 1, one OLMoE layer took 0.20 ms in gather + bmm against 0.33 ms for our first
    Triton kernel and 3.2 ms for the loop: BENCHMARKS.md)."""
    proxy = SlotExperts(module, views)
    if backend == "auto":
        per = sum(v[0].numel() * v.element_size() for v in views.values())
        backend = auto_backend(slot_index.numel(), per, next(iter(views.values())).is_cuda)
    if backend == "loop":
        return _eager(module)(proxy, hidden, slot_index, weights)
    if backend == "batched":
        return hf_moe.batched_mm_experts_forward(proxy, hidden, slot_index, weights)
    if backend == "grouped":
        return _grouped(module, views, hidden, slot_index, weights, slots)
    if backend == "triton":
        from moeflow.experts.triton_experts import triton_experts_forward

        return triton_experts_forward(proxy, hidden, slot_index, weights)
    raise ValueError(f"unknown expert backend {backend!r}: use auto, loop, batched, grouped or triton")
