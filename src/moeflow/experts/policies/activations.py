"""MoE-Infinity's activation-matrix store: the running requests' activations — each request's Expert Activation
Matrix (a ``RequestEAM``, which matches it against the collection), a recency-weighted copy of its counts, its own
activation ratios (the two mixed, row by row) and which layer rows it has routed at all — and the collection's
plumbing: where it is loaded from (``load_collection``), the finished requests' EAMs waiting to be admitted, and
saving it (``save_collection``).

The requests of the current step are held stacked ([B, L, E] arrays, rows in the step's order; the per-request
dicts hold views of those rows), so that a layer's routing updates every request of the step with a few NumPy
calls instead of a loop of small ones. The values are those of the one-request-at-a-time computation, bit for
bit: the counts are integer-valued, and every normalisation is the same per-row sum. Pure NumPy; the cache
decisions stay in ``moe_infinity``. Legend: B requests of the step, L layers, E experts, T tokens, K top-k.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.routing.eam import EAMCollection, row_normalise
from moeflow.routing.eam_match import RequestEAM

EAMC_FILE = Path("moeflow") / "eamc.npz"
"""Where the collection lives, relative to the model directory."""


def load_collection(
    source: object, model_dir: str | os.PathLike | None, shape: tuple[int, int], capacity: int
) -> EAMCollection:
    """The collection to start from: ``source`` (an ``EAMCollection``, copied, or a path), else the one beside the
    model (read only: nothing shipped beside a model is overwritten unless asked, see ``save_collection``), else
    an empty one of ``capacity``."""
    if isinstance(source, EAMCollection):
        if (source.num_layers, source.num_experts) != shape:
            raise MoeflowError(
                f"the EAM collection is for {source.num_layers} layers × {source.num_experts} experts, "
                f"the model has {shape[0]} × {shape[1]}: build one from this model's traces"
            )
        return source.copy()  # runs must not leak what they learn into each other
    if source:
        if not Path(source).exists():  # type: ignore[arg-type]
            raise MoeflowError(f"EAM collection {source} does not exist; build it with `moeflow eamc build`")
        return EAMCollection.load(source, *shape, capacity=None)  # type: ignore[arg-type]
    if model_dir:
        return EAMCollection.load(Path(model_dir) / EAMC_FILE, *shape, capacity=None)
    return EAMCollection(*shape, capacity)


def save_collection(eamc: EAMCollection, path: Path) -> None:
    """Save ``eamc`` to ``path`` (a warning, not an exception, when it cannot be written)."""
    try:
        eamc.save(path)
    except OSError as exc:
        warnings.warn(f"could not save the EAM collection to {path}: {exc}", stacklevel=3)


class RunningActivations:
    """Activations of the running requests (see the module docstring)."""

    def __init__(self, num_layers: int, num_experts: int, eam: type = RequestEAM):
        self.shape = (num_layers, num_experts)
        self.eam_type = eam
        """The running requests' EAM class: ``RequestEAM`` (canonical matching) or ``eam_unit.UnitRequestEAM``."""
        self.recent_weight = 0.5
        self.eams: dict[int, RequestEAM] = {}
        self._recent: dict[int, np.ndarray] = {}  # [L, E] recency-weighted counts (a row of ``recent``)
        self.rids: tuple[int, ...] = ()
        self.counts = np.zeros(
            (0, *self.shape)
        )  # [B, L, E] the step's requests' EAM counts (theirs are views)
        self.recent = np.zeros((0, *self.shape))  # [B, L, E] their recency-weighted counts
        self.own = np.zeros((0, *self.shape))  # [B, L, E] their own activation ratios (rows kept current)
        self.seen = np.zeros((0, num_layers, 1), bool)  # [B, L, 1] rows each has routed
        self.finished: list[np.ndarray] = []  # [L, E] EAMs of finished requests not admitted yet

    def begin_step(self, rids: Sequence[int], recency: float, recent_weight: float) -> None:
        """The step's requests (new ones start empty); their recency-weighted copies decay by ``recency`` once and
        make up ``recent_weight`` of the own ratios."""
        self.recent_weight = recent_weight
        for rid in rids:
            if rid not in self.eams:
                self.eams[rid] = self.eam_type(*self.shape)
                self._recent[rid] = np.zeros(self.shape)
        self.rids = tuple(rids)
        n = len(self.rids)
        self.counts = np.stack([self.eams[r].counts for r in self.rids]) if n else np.zeros((0, *self.shape))
        for i, rid in enumerate(self.rids):  # each EAM's counts: a row of ``counts`` (updated with it)
            self.eams[rid].counts = self.counts[i]
        self.recent = np.stack([self._recent[r] for r in self.rids]) if n else np.zeros((0, *self.shape))
        self.recent *= recency
        for i, rid in enumerate(self.rids):
            self._recent[rid] = self.recent[i]
        self.own = self._own_rows(slice(None))
        self.seen = self.counts.sum(axis=2, keepdims=True) > 0

    def add(self, layer: int, experts: np.ndarray, lengths: Sequence[int]) -> None:
        """The router of ``layer`` chose ``experts`` [T, K] for the step's tokens (``lengths`` per request,
        concatenated in step order; rows that do not add up are spread evenly, as ``np.array_split`` does)."""
        n, num_experts = len(self.rids), self.shape[1]
        ex = np.asarray(experts)
        sizes, ok = self._checked(ex, len(ex), lengths)
        if n == 1:
            added = np.bincount(ex[ok].astype(np.int64), minlength=num_experts)[None]  # [1, E]
        else:
            bins = np.repeat(
                np.arange(0, n * num_experts, num_experts), sizes
            )  # [T] first bin of the row's request
            added = np.bincount((ex + bins[:, None])[ok], minlength=n * num_experts)
            added = added.reshape(n, num_experts)  # [B, E]
        self.counts[:, layer] += added  # the EAMs' own counts (views)
        for rid in self.rids:
            self.eams[rid].changed(layer)
        self.recent[:, layer] += added
        self.own[:, layer] = self._own_rows(layer)  # only this row changed
        self.seen[:, layer, 0] = self.counts[:, layer].sum(axis=1) > 0

    def add_layers(self, experts: np.ndarray, lengths: Sequence[int]) -> None:
        """Every layer's routing of a step at once (``experts`` [L, T, K], a settled static step): the counts,
        ratios and routed rows ``add`` gives layer by layer, with one count and one normalisation."""
        n, (num_layers, num_experts) = len(self.rids), self.shape
        ex = np.asarray(experts)
        sizes, ok = self._checked(ex, ex.shape[1], lengths)
        request = np.repeat(np.arange(n), sizes)  # [T] the request of each row
        bins = (request[None, :] * num_layers + np.arange(num_layers)[:, None]) * num_experts  # [L, T]
        added = np.bincount((ex + bins[:, :, None])[ok], minlength=n * num_layers * num_experts)
        added = added.reshape(n, num_layers, num_experts)  # [B, L, E]
        self.counts += added  # the EAMs' own counts (views)
        for rid in self.rids:
            for layer in range(num_layers):
                self.eams[rid].changed(layer)
        self.recent += added
        self.own = self._own_rows(slice(None))
        self.seen = self.counts.sum(axis=2, keepdims=True) > 0

    def _checked(self, ex: np.ndarray, tokens: int, lengths: Sequence[int]) -> tuple[list[int], np.ndarray]:
        """(rows per request, the pairs to count: ids >= 0) of routing ``ex`` over ``tokens`` rows; rows that do not
        add up to ``lengths`` (padded or unexpected) are spread evenly, as ``np.array_split`` does. Refuses ids past
        the experts (they would count for the next request's)."""
        n, num_experts = len(self.rids), self.shape[1]
        sizes = (
            list(lengths) if sum(lengths) == tokens else [tokens // n + (i < tokens % n) for i in range(n)]
        )
        ok = ex >= 0
        if ok.any() and int(ex[ok].max()) >= num_experts:
            raise IndexError(f"expert id {int(ex[ok].max())} out of range for {num_experts} experts")
        return sizes, ok

    def end(self, rid: int) -> None:
        """Request ``rid`` finished: forget it; its EAM waits for ``admit_finished``."""
        eam = self.eams.pop(rid, None)
        self._recent.pop(rid, None)
        if eam is not None:
            self.finished.append(eam.counts.copy())

    def admit_finished(self, eamc: EAMCollection | None) -> None:
        """Admit the EAMs of the requests finished since the last call (each refreshes one entry's caches)."""
        if eamc is not None:
            for counts in self.finished:
                eamc.add(counts)
        self.finished = []

    def any_routed(self) -> bool:
        """Whether any request of the step has routed earlier tokens."""
        return bool(self.counts.any())

    def _own_rows(self, rows: int | slice) -> np.ndarray:
        """The step's requests' own activation ratios of layer ``rows``: their EAMs', mixed with their
        recency-weighted copies'."""
        own = row_normalise(self.counts[:, rows])
        if self.recent_weight > 0:
            own = (1 - self.recent_weight) * own + self.recent_weight * row_normalise(self.recent[:, rows])
        return own
