"""Cache policies; importing this package registers them by name: LRU and LFU (``classic``), MoE-Infinity,
ExpertFlow and the offline optimum (Belady)."""

from __future__ import annotations

from moeflow.experts.policies import belady, classic, expertflow, moe_infinity

__all__ = ["belady", "classic", "expertflow", "moe_infinity"]
