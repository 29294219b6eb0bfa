"""The engine: ``LLM`` (llm.py: the API and the eager step), the static decode path (static.py: a static KV cache,
slot-table experts, one captured CUDA graph per decode step) and its KV cache and masks (kv.py)."""

from __future__ import annotations

from moeflow.engine.llm import LLM, ModelInfo, resolve_device

__all__ = ["LLM", "ModelInfo", "resolve_device"]
