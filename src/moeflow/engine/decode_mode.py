"""Which decode path a configuration gets: the static decoder (a captured graph per step on a GPU, the same step
run eagerly elsewhere) or the eager per-layer path, and a one-line error for a mode that cannot run here (quantised
formats the slot kernels do not read, graphs without CUDA, a host pool too small for zero-copy misses)."""

from __future__ import annotations

import torch

from moeflow.config import EngineConfig, format_size
from moeflow.engine.static import StaticDecoder
from moeflow.errors import RequestError
from moeflow.experts.layer import Runtime
from moeflow.experts.quant_proj import SLOT_FORMATS, unsupported
from moeflow.memory import MemoryPlan
from moeflow.model.loader import LoadedModel


def choose_static(
    cfg: EngineConfig, device: torch.device, loaded: LoadedModel, runtime: Runtime, memory: MemoryPlan
) -> StaticDecoder | None:
    """The static decode path for ``cfg.decode`` (None: decode eagerly), or a one-line error for a mode that
    cannot run here."""
    mode, cuda = cfg.decode, device.type == "cuda"
    host, low = loaded.codecs.host, loaded.codecs.low  # the slot kernels read full rows and SLOT_FORMATS rows
    why = f"a --miss-dtype {low.fmt.name} copy" if low is not None else host and unsupported(host)
    if why:
        if mode in ("graph", "static"):
            raise RequestError(f"decode={mode!r} cannot run {why}; it runs experts in full precision or "
                               f"{', '.join(SLOT_FORMATS)}: use decode='eager' (or auto)")  # fmt: skip
        return None
    if mode == "eager":
        return None
    if mode == "graph" and not cuda:
        raise RequestError("decode='graph' needs a CUDA device; use decode='static' or 'eager' on a CPU")
    # a CPU budget reserves nothing for activations (they are ordinary RAM) unless asked
    budgeted = (cfg.device_memory is not None and cuda) or cfg.kv_reserve is not None
    graphs = cuda and mode != "static"
    compiled = graphs if cfg.compile is None else cfg.compile
    try:
        decoder = StaticDecoder(loaded, runtime, graphs=graphs, kv_budget=memory.kv_budget if budgeted else None,
                                compiled=compiled, must_compile=cfg.compile is True)  # fmt: skip
    except NotImplementedError as err:
        if mode == "auto":
            return None
        raise RequestError(f"decode={mode!r} is not available for this model: {err}") from None
    if compiled and mode == "static" and not decoder.table.zero_copy:
        raise RequestError(
            "compile=True needs every expert in the host pool (the compiled step reads misses from it by address): "
            "raise --host-memory, or pass --no-compile"
        )
    if decoder.graphs and not decoder.table.zero_copy:  # the kernel reads misses from the pinned host pool
        if mode == "auto":
            return None
        total = len(loaded.layers) * loaded.num_experts
        raise RequestError(
            f"decode='graph' needs every expert in the pinned host pool ({total} experts, "
            f"{format_size(total * loaded.expert_bytes)}) but the host budget holds {runtime.store.host_capacity}: "
            "raise --host-memory, or use --decode static or eager"
        )
    return decoder if cuda or mode != "auto" else None
