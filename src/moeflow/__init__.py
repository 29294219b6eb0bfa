"""moeflow: run Mixture-of-Experts language models larger than device memory.

Dense weights live on the compute device; experts are tiered disk → host RAM → a fixed pool of device slots,
driven by pluggable cache policies. ``LLM`` and ``SamplingParams`` are the Python entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams"]

if TYPE_CHECKING:
    from moeflow.config import EngineConfig
    from moeflow.engine import LLM
    from moeflow.sampling import SamplingParams


def __getattr__(name: str):  # lazy: `moeflow --help` and pure-policy code need no torch import
    if name == "LLM":
        from moeflow.engine import LLM

        return LLM
    if name == "SamplingParams":
        from moeflow.sampling import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from moeflow.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
