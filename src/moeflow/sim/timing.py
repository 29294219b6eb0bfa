"""The simulator's time model: modelled time per token from counted expert loads, a host→device bandwidth and
a per-layer compute time.

Per forward step ``s`` (``L`` MoE layers, ``B`` bytes per expert, bandwidth ``W``, compute per layer ``c``):

    t_s = max(L·c, prefetch_loads_s·B / W) + demand_loads_s·B / W

Prefetched copies overlap the step's compute (they run on a copy stream while earlier layers compute); demand
misses stall compute. Time per token = Σ t_s over decode steps / decode tokens (prefill steps are reported
apart: the model has one compute figure per layer, whatever the number of tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BANDWIDTH = 52e9
"""Host→GPU copy bandwidth in bytes/s (pinned memory, measured on an H100 by the project lead)."""
DEFAULT_COMPUTE_PER_LAYER = 0.25e-3
"""Seconds of compute per MoE layer per step when no expert must be waited for. An assumption, not a
measurement: override it with ``--compute-per-layer-ms`` for the model and batch being modelled."""


@dataclass(frozen=True)
class TimingModel:
    expert_bytes: int
    """Bytes one expert moves (all its weight matrices)."""
    bandwidth: float = DEFAULT_BANDWIDTH
    """Host→device bytes per second."""
    compute_per_layer: float = DEFAULT_COMPUTE_PER_LAYER
    """Seconds per MoE layer per step (attention + resident experts)."""

    def step_times(self, num_layers: int, demand: np.ndarray, prefetch: np.ndarray) -> np.ndarray:
        """Modelled seconds [S] of each step from its demand and prefetch load counts [S]."""
        compute = num_layers * self.compute_per_layer
        prefetch_s = np.asarray(prefetch, np.float64) * self.expert_bytes / self.bandwidth
        demand_s = np.asarray(demand, np.float64) * self.expert_bytes / self.bandwidth
        return np.maximum(compute, prefetch_s) + demand_s

    def summary(
        self,
        num_layers: int,
        demand: np.ndarray,
        prefetch: np.ndarray,
        decode_tokens: np.ndarray,
        prefill: np.ndarray,
    ) -> dict[str, float | None]:
        """Totals over a run from per-step arrays [S]: loads, decode tokens, and whether the step was a prefill."""
        times = self.step_times(num_layers, demand, prefetch)  # [S]
        compute = num_layers * self.compute_per_layer
        prefetch_s = np.asarray(prefetch, np.float64) * self.expert_bytes / self.bandwidth
        demand_s = np.asarray(demand, np.float64) * self.expert_bytes / self.bandwidth
        transfer = float(prefetch_s.sum() + demand_s.sum())
        hidden = float(np.minimum(prefetch_s, compute).sum())
        dec = ~np.asarray(prefill, bool)
        n_tok = int(np.asarray(decode_tokens)[dec].sum())
        return {
            "time_per_token_s": float(times[dec].sum()) / n_tok if n_tok else None,
            "decode_time_s": float(times[dec].sum()),
            "prefill_time_s": float(times[~dec].sum()),
            "compute_only_per_token_s": float(dec.sum() * compute) / n_tok if n_tok else None,
            "transfer_time_s": transfer,
            "transfer_hidden_share": hidden / transfer if transfer else None,
        }

    def constants(self) -> dict[str, float | int | str]:
        """The model's constants, stated in every result."""
        return {
            "expert_bytes": self.expert_bytes,
            "bandwidth_GBps": self.bandwidth / 1e9,
            "compute_per_layer_ms": self.compute_per_layer * 1e3,
            "formula": "per step: max(L*compute_per_layer, prefetch_loads*expert_bytes/bandwidth) "
            "+ demand_loads*expert_bytes/bandwidth; time/token over decode steps",
        }
