"""Cache policies; importing this package registers them by name: LRU and LFU (``classic``), MoE-Infinity,
ExpertFlow, ExpertFlow with request-level reuse (``reuse``), LRU prefetching by the hybrid predictor's forecasts
(``gated``) and the offline optimum (Belady). :func:`make_policy` builds one by name."""

from __future__ import annotations

from moeflow.errors import MoeflowError
from moeflow.experts.cache import POLICIES, CachePolicy
from moeflow.experts.policies import belady, classic, expertflow, gated, moe_infinity, reuse

__all__ = ["belady", "classic", "expertflow", "gated", "make_policy", "moe_infinity", "reuse"]


def make_policy(spec: str | CachePolicy) -> CachePolicy:
    """A policy instance from a registered name or an instance (returned as is)."""
    if isinstance(spec, CachePolicy):
        return spec
    if spec not in POLICIES:
        raise MoeflowError(f"unknown cache policy {spec!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return POLICIES[spec]()
