"""Expert Activation Matrices (MoE-Infinity, arXiv 2401.14361): the per-request L×E routing count, the
bounded collection (EAMC) of past requests' EAMs with its admission rule and atomic persistence, and the
prefix matching that predicts the layers still ahead of a running request (the running requests' cached,
step-batched matching is ``routing.eam_match``).

Legend: ``L`` MoE layers, ``E`` experts per layer, ``K`` experts per token, ``T`` tokens, ``N`` collection entries.

Admission rule (keeps the collection representative, like online k-means with capacity-many clusters whose
representative is their latest member): an empty EAM is rejected; while there is room every EAM enters;
once full, the new EAM *replaces its nearest entry* (cosine similarity of the row-normalised matrices) and that
entry's member count grows by one. A new pattern therefore never pushes out a different pattern: each entry
stands for a cluster of similar requests, kept current by its most recent member.

Matching: the query and the entries are compared on row-normalised matrices (each layer's row is the share of
that layer's routing going to each expert, so long prompts do not outweigh short ones), flattened over the
rows ``0..upto`` only (the layers the running request has executed), by cosine similarity, in the canonical
form of ``routing.eam_index`` (which also holds the entries' matching views, refreshed per admission).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moeflow.routing.eam_index import EntryIndex, cosine, row_normalise

__all__ = ["EAMCollection", "cosine", "eam_from_experts", "eams_from_trace", "row_normalise"]

FORMAT = "moeflow-eamc/1"
DEFAULT_CAPACITY = 1000


def eam_from_experts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Counts [L, E] from routing ``experts`` [T, L, K] (ids < 0 are padding and ignored)."""
    _, num_layers, _ = experts.shape
    out = np.zeros((num_layers, num_experts), np.float64)  # [L, E]
    layer_of = np.broadcast_to(np.arange(num_layers)[None, :, None], experts.shape)  # [T, L, K]
    valid = experts >= 0
    np.add.at(out, (layer_of[valid], experts[valid]), 1.0)
    return out


def eams_from_trace(trace: object) -> dict[int, np.ndarray]:
    """One EAM [L, E] per request of a ``Trace`` (prefill and decode tokens), in order of first appearance."""
    out: dict[int, np.ndarray] = {}
    for rid in trace.requests():  # type: ignore[attr-defined]
        rows = trace.request == rid  # type: ignore[attr-defined]
        out[rid] = eam_from_experts(trace.experts[rows], trace.num_experts)  # type: ignore[attr-defined]
    return out


class EAMCollection:
    """A bounded set of past EAMs (see the module docstring for the admission rule)."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("EAM collection capacity must be at least 1")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._n = 0
        self._buf = np.zeros(
            (0, num_layers, num_experts), np.float32
        )  # [>=N, L, E] counts, grown by doubling
        self.members = np.zeros(0, np.int64)  # [N] EAMs each entry stands for
        self.version = 0
        """Bumped whenever an entry changes (matchers holding cached dot products catch up, see ``changed_since``)."""
        self._changes: list[int] = []  # entry index changed by each version bump
        self._index: EntryIndex | None = None  # matching views, built on first use
        self._unit_t: np.ndarray | None = (
            None  # [L, >=N, E] row-normalised entries, layer-major (on first use)
        )
        self._cum_sq: np.ndarray | None = None  # [L, >=N] running sum over rows of their squared norms

    @property
    def entries(self) -> np.ndarray:
        """[N, L, E] counts (a view; assign a whole array to replace them)."""
        return self._buf[: self._n]

    @entries.setter
    def entries(self, value: np.ndarray) -> None:
        self._buf = np.array(value, np.float32)
        self._n = len(self._buf)
        self._index = self._unit_t = self._cum_sq = None

    def __len__(self) -> int:
        return self._n

    def copy(self) -> EAMCollection:
        out = EAMCollection(self.num_layers, self.num_experts, self.capacity)
        out.entries, out.members = self.entries.copy(), self.members.copy()
        return out

    def changed_since(self, version: int) -> list[int] | None:
        """Entry indices changed after ``version`` (None: unknown, e.g. the entries were replaced wholesale)."""
        if version > self.version or version < self.version - len(self._changes):
            return None
        return self._changes[len(self._changes) - (self.version - version) :]

    # ------------------------------------------------------------------------------ matching
    @property
    def index(self) -> EntryIndex:
        """The entries' matching views (``routing.eam_index``), built on first use and refreshed per admission."""
        if self._index is None or self._index.capacity != len(self._buf):
            self._index = EntryIndex(self._buf)
        return self._index

    @property
    def unit_by_layer(self) -> np.ndarray:
        """Row-normalised entries, layer-major [L, N, E] (contiguous per layer: one layer's rows of every entry).
        Built on first use and refreshed per admission; only the per-request products of ``routing.eam_unit``
        use it (the canonical matching reads ``index``)."""
        if self._unit_t is None:
            self._unit_t = np.ascontiguousarray(
                row_normalise(self._buf.astype(np.float64)).transpose(1, 0, 2)
            )
        return self._unit_t[:, : self._n]

    @property
    def unit(self) -> np.ndarray:
        """Row-normalised entries [N, L, E] (a view of ``unit_by_layer``)."""
        return self.unit_by_layer.transpose(1, 0, 2)

    @property
    def cum_sq_by_layer(self) -> np.ndarray:
        """[L, N]: squared norm of each entry's normalised rows 0..l (row ``l`` contiguous; with ``unit_by_layer``)."""
        if self._cum_sq is None:
            _ = self.unit_by_layer  # builds the layer-major buffer
            self._cum_sq = np.cumsum((self._unit_t**2).sum(axis=2), axis=0)  # type: ignore[operator]
        return self._cum_sq[:, : self._n]

    def unit_rows(self, idx: int) -> np.ndarray:
        """Entry ``idx``'s normalised rows [L, E] (read only; ``unit_by_layer[:, idx]``'s values)."""
        return self.index.unit(self._buf, idx)

    def similarity(self, query: np.ndarray, upto: int) -> np.ndarray:
        """Cosine similarity [N] between ``query`` [L, E] and every entry over rows 0..upto (the canonical form
        of ``routing.eam_index``: for integer counts, exactly what a running request's cached match gives)."""
        return self.index.similarity(query, upto, self._n)

    def nearest(self, sims: np.ndarray, k: int = 1) -> np.ndarray:
        """Indices of the ``k`` largest similarities, best first."""
        k = min(k, len(sims))
        idx = np.argpartition(-sims, k - 1)[:k]
        return idx[np.argsort(-sims[idx], kind="stable")]

    def predict(self, sims: np.ndarray, k: int = 1) -> np.ndarray | None:
        """Predicted activation ratios [L, E] (rows sum to 1): the best entry's normalised rows, or the top-k
        entries' rows weighted by similarity. None when the collection is empty."""
        if len(self) == 0:
            return None
        idx = self.nearest(sims, k)
        w = np.clip(sims[idx], 0.0, None)
        if w.sum() <= 0:
            w = np.ones_like(w)
        if len(idx) == 1:
            return self.unit_rows(int(idx[0])) * (w[0] / w.sum())
        rows = np.stack([self.unit_rows(int(i)) for i in idx], axis=1)  # [L, k, E]
        return np.einsum("n,lne->le", w / w.sum(), rows)

    # ----------------------------------------------------------------------------- admission
    def add(self, eam: np.ndarray) -> int:
        """Admit a finished request's EAM [L, E]; returns the entry index it went to (-1: rejected, empty)."""
        eam = np.asarray(eam, np.float32)
        if eam.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"EAM of shape {eam.shape}, collection holds {(self.num_layers, self.num_experts)}"
            )
        if not eam.any():
            return -1
        if len(self) < self.capacity:
            idx = self._n
            if idx == len(self._buf):  # grow by doubling (up to capacity): appends stay O(L·E)
                grown = np.zeros((min(self.capacity, max(4, 2 * idx)), *eam.shape), np.float32)
                grown[:idx] = self._buf
                self._buf = grown
                self._index = self._unit_t = self._cum_sq = None
            self._n += 1
            self.members = np.concatenate([self.members, [1]])
        else:
            idx = int(np.argmax(self.similarity(eam, self.num_layers - 1)))
            self.members[idx] += 1
        self._buf[idx] = eam
        self._changed(idx)
        return idx

    def extend(self, eams: Iterable[np.ndarray]) -> None:
        for eam in eams:
            self.add(eam)

    @classmethod
    def from_traces(
        cls, traces: Iterable[object], capacity: int = DEFAULT_CAPACITY, progress: bool = False
    ) -> EAMCollection:
        """A collection of every request of ``traces`` (all of one model shape), admitted in order (``progress``: a
        bar over the requests, on stderr)."""
        from tqdm.auto import tqdm

        out: EAMCollection | None = None
        for trace in traces:
            if out is None:
                out = cls(trace.num_layers, trace.num_experts, capacity)  # type: ignore[attr-defined]
            eams = eams_from_trace(trace).values()
            out.extend(tqdm(eams, desc="eamc build", unit="request", disable=not progress, leave=False))
        if out is None:
            raise ValueError("no traces given")
        return out

    def _changed(self, idx: int) -> None:
        """Entry ``idx`` was written: refresh its normalised rows and norms only."""
        self.version += 1
        self._changes.append(idx)
        del self._changes[: -self.capacity]
        if self._index is not None:
            self._index.refresh(self._buf, idx)
        if self._unit_t is not None and self._cum_sq is not None:
            unit = row_normalise(self._buf[idx].astype(np.float64))  # [L, E]
            self._unit_t[:, idx] = unit
            self._cum_sq[:, idx] = np.cumsum((unit**2).sum(axis=1))

    # ---------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, then ``os.replace`` (never a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez_compressed(
                tmp,
                format=np.array(FORMAT),
                capacity=np.array(self.capacity),
                entries=self.entries.astype(np.float32),
                members=self.members.astype(np.int64),
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(
        cls, path: str | os.PathLike, num_layers: int, num_experts: int, capacity: int | None = None
    ) -> EAMCollection:
        """The collection saved at ``path``. A missing file gives an empty collection; an unreadable or
        mismatched one gives a warning and an empty collection (never an exception)."""
        empty = cls(num_layers, num_experts, capacity or DEFAULT_CAPACITY)
        if not Path(path).exists():
            return empty
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise ValueError(f"format {str(z['format'])!r}, expected {FORMAT!r}")
                entries = z["entries"].astype(np.float32)
                members = z["members"].astype(np.int64)
                saved_capacity = int(z["capacity"])
            if entries.ndim != 3 or entries.shape[1:] != (num_layers, num_experts):
                raise ValueError(
                    f"entries of shape {entries.shape[1:]}, the model has {(num_layers, num_experts)}"
                )
            if members.shape != (entries.shape[0],) or not np.isfinite(entries).all() or (entries < 0).any():
                raise ValueError("entries and member counts disagree or hold invalid counts")
        except Exception as exc:
            warnings.warn(
                f"EAM collection {path} is unreadable ({exc}); starting with an empty collection. "
                "Rebuild it with `moeflow eamc build` or delete the file.",
                stacklevel=2,
            )
            return empty
        out = cls(num_layers, num_experts, capacity or max(saved_capacity, entries.shape[0]))
        keep = min(out.capacity, entries.shape[0])
        out.entries, out.members = entries[:keep], members[:keep]
        return out
