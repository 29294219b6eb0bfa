"""Typed, frozen messages between the cache policies (which decide) and the store and kernels (which execute).

Legend: L MoE layers, E experts per layer, T tokens of a step, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

Key = tuple[int, int]
"""(MoE layer index, expert id)."""


class Load(NamedTuple):
    """Copy expert ``key`` into device ``slot`` (whatever held ``evicted`` is dropped). Immutable; a named tuple
    (not a frozen dataclass) because a layer's misses build one each: ``placement.make_loads`` builds them in one
    C-level pass."""

    key: Key
    slot: int
    evicted: Key | None = None
    prefetch: bool = False
    priority: float = 0.0
    """Larger first. Demand loads (misses of the layer about to run) always go before prefetches."""


@dataclass(frozen=True)
class Plan:
    """What a layer needs done before it can compute."""

    layer: int
    slots: tuple[int, ...]
    """Slot of each requested expert, in request order."""
    loads: tuple[Load, ...]
    """Demand loads (misses) the store must complete before the layer computes."""
    hits: int
    misses: int


@dataclass(frozen=True)
class StepInfo:
    """What is known about a forward step before its first MoE layer runs."""

    step: int
    request_ids: tuple[int, ...]
    """One per sequence in the batch."""
    token_ids: tuple[tuple[int, ...], ...]
    """The new input tokens of each sequence in this step (the whole prompt at prefill)."""
    positions: tuple[int, ...]
    """Position of each sequence's first new token."""
    prefill: bool


@dataclass(frozen=True)
class Forecast:
    """A routing forecast for MoE layer ``layer`` of the running step, made ``distance`` layers before it routes."""

    layer: int
    distance: int
    scores: np.ndarray
    """[T, E] each of the step's tokens' expected use of each expert (a token's row sums to about K)."""


@dataclass(frozen=True)
class StepRouting:
    """What a static decode step did, read back from the device after it (see ``CachePolicy.settle_step``)."""

    experts: np.ndarray
    """[L, T, K] expert ids chosen by the routers for the step's live tokens."""
    served: np.ndarray
    """[L, E] int8: 0 the expert was not used, 1 read from its device slot (hit), 2 read from host memory (miss)."""
    filled: np.ndarray
    """[L, E] int32: the candidate slot a missed expert was written into while it was read (-1: none)."""


@dataclass(frozen=True)
class Boundary:
    """What the store does between two static decode steps: the slot table is rebuilt from ``resident`` (evictions
    take effect), ``loads`` are copied on a side stream, and ``candidates`` are offered for read-through fills."""

    loads: tuple[Load, ...]
    """Prefetches for the coming step (their slots' old keys are evicted)."""
    candidates: tuple[int, ...]
    """Slots a missed expert may be written into as the kernel reads it, in order of preference: free slots, then
    victims. A victim stays resident unless claimed, and the device claims it for a miss of layer ``l`` only when
    its key cannot be needed again in the step (its layer ran and did not use it, or it is layer ``l``'s and
    unrouted), so a fill never destroys an expert the step still reads."""
    resident: np.ndarray
    """[S] int64: the key in each slot after this boundary, as layer * E + expert (-1: empty)."""


@dataclass
class PolicyContext:
    """What a policy may use besides routing: given once, by the engine or the simulator, via ``setup``."""

    model_dir: str | None = None
    """The checkpoint directory (EAM collections and predictors are saved beside the model)."""
    trace: object | None = None
    """Simulator only: the whole ``Trace`` being replayed (the offline optimum needs the future)."""
    options: dict = field(default_factory=dict)
    """Free-form options (EngineConfig.extra, or simulator flags)."""
