"""The engine: ``LLM`` (llm.py: the API, the run loop and the eager step), what opens and closes every step
(step.py), the device, model shape and tokenizer it is built from (setup.py), which decode path a configuration
gets (decode_mode.py), the static decode path (static.py: buckets, graph capture and replay) and its KV cache and
masks (kv.py), and continuous batching (batch.py: ``BatchEngine.add/step/abort``; static_rows.py its rows of one
static bucket, rows.py the eager row pool; admission.py; serial.py)."""

from __future__ import annotations

from moeflow.engine.llm import LLM
from moeflow.engine.setup import ModelInfo, resolve_device

__all__ = ["LLM", "ModelInfo", "resolve_device"]
