"""The paper policies (MoE-Infinity, ExpertFlow) and the offline optimum (Belady); importing registers them."""

from __future__ import annotations

import importlib

for _name in ("belady", "moe_infinity", "expertflow"):
    try:
        importlib.import_module(f"moeflow.experts.policies.{_name}")
    except ModuleNotFoundError as _exc:  # a module not written yet
        if _exc.name != f"moeflow.experts.policies.{_name}":
            raise
