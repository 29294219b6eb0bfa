"""Expert placement: each (MoE layer, expert) gets one home rank, whose slot pool caches it (pure NumPy).

Homes are chosen per layer from the experts' popularity (how often the router chose each one, from a routing trace,
or uniform when there is none): experts are taken in order of decreasing popularity and each goes to the rank with
the least popularity placed so far in that layer (greedy largest-first). Every layer is balanced on its own, since
the layers run one after the other and a rank idle in one layer cannot make up for it in the next.
Legend: L MoE layers, E experts per layer, R ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow.errors import ConfigError, TraceError
from moeflow.routing.trace import Trace


@dataclass(frozen=True)
class Placement:
    """The home rank of every expert."""

    home: np.ndarray
    """[L, E] int64: the rank that computes (and caches) each expert."""
    world_size: int

    def mine(self, rank: int) -> np.ndarray:
        """[L, E] bool: the experts homed on ``rank``."""
        return self.home == rank

    def keys(self, rank: int) -> list[tuple[int, int]]:
        """(layer, expert) keys homed on ``rank``, layer by layer."""
        layers, experts = np.nonzero(self.mine(rank))
        return list(zip(layers.tolist(), experts.tolist()))

    def load(self, popularity: np.ndarray) -> np.ndarray:
        """[L, R] the popularity each rank serves per layer."""
        out = np.zeros((self.home.shape[0], self.world_size), np.float64)
        rows = np.broadcast_to(np.arange(self.home.shape[0])[:, None], self.home.shape)
        np.add.at(out, (rows, self.home), popularity)
        return out


def place(popularity: np.ndarray, world_size: int) -> Placement:
    """Homes for ``popularity`` [L, E] (any non-negative weights) over ``world_size`` ranks, balanced per layer.

    Ties go to the lower expert id first and onto the lower rank, so every rank computes the same placement; with
    equal popularity the experts are dealt round-robin (expert ``e`` on rank ``e % R``)."""
    pop = np.asarray(popularity, dtype=np.float64)
    if pop.ndim != 2 or pop.shape[1] == 0:
        raise ConfigError(f"expert popularity must be [layers, experts], got shape {pop.shape}")
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    if not np.isfinite(pop).all() or (pop < 0).any():
        raise ConfigError("expert popularity must be finite and non-negative")
    num_layers, num_experts = pop.shape
    home = np.empty((num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        load = np.zeros(world_size, np.float64)
        count = np.zeros(world_size, np.int64)
        for e in np.argsort(-pop[layer], kind="stable").tolist():
            # least load first; on equal load the rank holding fewer experts, then the lowest rank
            rank = int(np.lexsort((np.arange(world_size), count, load))[0])
            home[layer, e] = rank
            load[rank] += pop[layer, e]
            count[rank] += 1
    return Placement(home, world_size)


def uniform(num_layers: int, num_experts: int, world_size: int) -> Placement:
    """Round-robin homes (no routing known)."""
    return place(np.ones((num_layers, num_experts)), world_size)


def from_trace(trace: Trace, num_layers: int, num_experts: int, world_size: int) -> Placement:
    """Homes from the routing recorded in ``trace`` (every choice of every token counts once)."""
    if trace.num_layers != num_layers or trace.num_experts != num_experts:
        raise TraceError(
            f"the placement trace has {trace.num_layers} MoE layers of {trace.num_experts} experts but the model "
            f"has {num_layers} of {num_experts}: record a trace of this model (moeflow trace)"
        )
    chosen = trace.experts.astype(np.int64)  # [N, L, K]; -1 where a layer was not recorded
    layer = np.broadcast_to(np.arange(num_layers)[None, :, None], chosen.shape)
    valid = chosen >= 0
    flat = layer[valid] * num_experts + chosen[valid]
    counts = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return place(counts, world_size)
