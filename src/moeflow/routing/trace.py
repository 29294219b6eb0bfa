"""Routing traces: the on-disk format, a recorder the engine feeds, and a replay source.

A trace is one ``.npz`` file. Metadata (0-d arrays): ``format`` ("moeflow-trace/1"), ``model`` (name),
``num_layers`` (MoE layers L), ``num_experts`` (E), ``top_k`` (K), ``moe_layer_ids`` [L] (the transformer
layer index of each MoE layer), ``mapping`` (free text: how the trace was mapped onto another shape, "" if not).
Per token row (N rows, in the order the engine ran them):

====================  ==========  ======================================================
``request``           int32 [N]   request id
``position``          int32 [N]   position of the token in its sequence
``decode``            bool  [N]   False for prefill tokens, True for decode tokens
``step``              int32 [N]   engine forward step the token ran in (tokens of a step ran together)
``token``             int32 [N]   input token id at that position (-1 if unknown)
``experts``           int16 [N, L, K]  chosen experts per MoE layer, first choice first
``weights``           float32 [N, L, K]  their gate weights
====================  ==========  ======================================================

Optional: ``prompts`` (str [R]) and ``prompt_request`` (int32 [R]) naming each request's prompt.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeflow.errors import TraceError

FORMAT = "moeflow-trace/1"


@dataclass
class Trace:
    """An in-memory routing trace (see the module docstring for the fields)."""

    model: str
    num_experts: int
    top_k: int
    request: np.ndarray
    position: np.ndarray
    decode: np.ndarray
    step: np.ndarray
    token: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    moe_layer_ids: np.ndarray | None = None
    mapping: str = ""
    prompts: dict[int, str] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    def requests(self) -> list[int]:
        """Request ids in order of first appearance."""
        _, first = np.unique(self.request, return_index=True)
        return [int(self.request[i]) for i in sorted(first)]

    def select(self, mask: np.ndarray) -> Trace:
        """The rows where ``mask`` is True (metadata kept)."""
        return Trace(
            self.model,
            self.num_experts,
            self.top_k,
            self.request[mask],
            self.position[mask],
            self.decode[mask],
            self.step[mask],
            self.token[mask],
            self.experts[mask],
            self.weights[mask],
            self.moe_layer_ids,
            self.mapping,
            {r: p for r, p in self.prompts.items() if r in set(self.request[mask].tolist())},
        )

    def of_requests(self, ids: list[int]) -> Trace:
        return self.select(np.isin(self.request, np.asarray(ids)))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename): a crash never leaves a half-written trace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        req_ids = sorted(self.prompts)
        arrays = {
            "format": np.array(FORMAT),
            "model": np.array(self.model),
            "num_layers": np.array(self.num_layers),
            "num_experts": np.array(self.num_experts),
            "top_k": np.array(self.top_k),
            "moe_layer_ids": np.asarray(
                self.moe_layer_ids if self.moe_layer_ids is not None else np.arange(self.num_layers), np.int32
            ),
            "mapping": np.array(self.mapping),
            "request": self.request.astype(np.int32),
            "position": self.position.astype(np.int32),
            "decode": self.decode.astype(bool),
            "step": self.step.astype(np.int32),
            "token": self.token.astype(np.int32),
            "experts": self.experts.astype(np.int16),
            "weights": self.weights.astype(np.float32),
            "prompts": np.array([self.prompts[r] for r in req_ids], dtype=str),
            "prompt_request": np.array(req_ids, dtype=np.int32),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        try:
            z = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise TraceError(f"trace file {path} does not exist") from None
        except Exception as exc:
            raise TraceError(f"{path} is not a readable moeflow trace (.npz): {exc}") from exc
        with z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise TraceError(f"{path} is not a {FORMAT} file; record one with `moeflow trace`")
            experts = z["experts"].astype(np.int64)
            n = experts.shape[0]
            for name in ("request", "position", "decode", "step", "token", "weights"):
                if z[name].shape[0] != n:
                    raise TraceError(f"{path}: field {name!r} has {z[name].shape[0]} rows, experts has {n}")
            prompts = {int(r): str(p) for r, p in zip(z["prompt_request"], z["prompts"])}
            return cls(
                model=str(z["model"]),
                num_experts=int(z["num_experts"]),
                top_k=int(z["top_k"]),
                request=z["request"].astype(np.int64),
                position=z["position"].astype(np.int64),
                decode=z["decode"].astype(bool),
                step=z["step"].astype(np.int64),
                token=z["token"].astype(np.int64),
                experts=experts,
                weights=z["weights"].astype(np.float32),
                moe_layer_ids=z["moe_layer_ids"].astype(np.int64),
                mapping=str(z["mapping"]),
                prompts=prompts,
            )


class TraceRecorder:
    """Collects routing while the engine runs. The engine calls ``begin_step``, ``record`` per MoE layer and
    ``end_step``; ``trace()`` returns what was recorded."""

    def __init__(self, model: str, num_layers: int, num_experts: int, top_k: int, moe_layer_ids: list[int]):
        self.model, self.num_layers, self.num_experts, self.top_k = model, num_layers, num_experts, top_k
        self.moe_layer_ids = np.asarray(moe_layer_ids)
        self._rows: list[dict[str, np.ndarray]] = []
        self._cur: dict[str, np.ndarray] | None = None
        self.prompts: dict[int, str] = {}

    def begin_step(
        self,
        step: int,
        request_ids: list[int],
        positions: list[list[int]],
        tokens: list[list[int]],
        prefill: bool,
    ) -> None:
        """Tokens of this step, sequence by sequence (flattened in the same order the experts see them)."""
        req = np.concatenate([np.full(len(p), r) for r, p in zip(request_ids, positions)])
        pos = np.concatenate([np.asarray(p) for p in positions])
        tok = np.concatenate([np.asarray(t) for t in tokens])
        n = len(req)
        self._cur = {
            "request": req,
            "position": pos,
            "token": tok,
            "step": np.full(n, step),
            "decode": np.full(n, not prefill),
            "experts": np.full((n, self.num_layers, self.top_k), -1, np.int16),
            "weights": np.zeros((n, self.num_layers, self.top_k), np.float32),
        }

    def record(
        self, layer: int, experts: np.ndarray, weights: np.ndarray, keep: np.ndarray | None = None
    ) -> None:
        """``experts``/``weights`` [T, K] for the step's tokens (``keep`` selects the real, unpadded rows)."""
        if self._cur is None:
            return
        if keep is not None:
            experts, weights = experts[keep], weights[keep]
        self._cur["experts"][:, layer] = experts
        self._cur["weights"][:, layer] = weights

    @property
    def steps(self) -> int:
        """Completed steps recorded so far (a step interrupted half-way is not among them)."""
        return len(self._rows)

    def end_step(self) -> None:
        if self._cur is not None:
            self._rows.append(self._cur)
        self._cur = None

    def trace(self) -> Trace:
        if not self._rows:
            raise TraceError("nothing was recorded")
        cat = {k: np.concatenate([r[k] for r in self._rows]) for k in self._rows[0]}
        return Trace(
            model=self.model,
            num_experts=self.num_experts,
            top_k=self.top_k,
            request=cat["request"],
            position=cat["position"],
            decode=cat["decode"],
            step=cat["step"],
            token=cat["token"],
            experts=cat["experts"].astype(np.int64),
            weights=cat["weights"],
            moe_layer_ids=self.moe_layer_ids,
            prompts=dict(self.prompts),
        )


class TraceReplay:
    """Replay source for benchmarks: each token's experts and gate weights come from a trace, looked up by
    (request, position), instead of from the router. ``layer_map``/``expert_map`` state how a trace of another
    shape is laid onto the model (the mapping text goes into every result that uses it)."""

    def __init__(self, trace: Trace, num_layers: int, num_experts: int, top_k: int):
        if trace.top_k != top_k:
            raise TraceError(f"trace has top-{trace.top_k} routing but the model routes top-{top_k}")
        if trace.num_experts > num_experts:
            raise TraceError(f"trace uses {trace.num_experts} experts, the model has only {num_experts}")
        self.trace = trace
        self.layer_map = np.arange(num_layers) % trace.num_layers
        self.mapping = (
            ""
            if trace.num_layers == num_layers and trace.num_experts == num_experts
            else f"model layer l <- trace layer l mod {trace.num_layers}; expert ids kept "
            f"(trace E={trace.num_experts}, model E={num_experts})"
        )
        self._index = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(trace.request, trace.position))}

    def rows(self, request_ids: list[int], positions: list[list[int]]) -> np.ndarray:
        """Trace rows for a step's tokens; raises when a (request, position) is not in the trace."""
        out = []
        for r, ps in zip(request_ids, positions):
            for p in ps:
                try:
                    out.append(self._index[(r, p)])
                except KeyError:
                    raise TraceError(
                        f"the replay trace has no token for request {r} position {p}: replay the same prompts "
                        "with at most the recorded number of tokens"
                    ) from None
        return np.asarray(out, np.int64)

    def token(self, request: int, position: int) -> int | None:
        """The recorded input token at (request, position), if the trace has it (so replay follows the trace's
        text, and predictors see the tokens the routing came from)."""
        i = self._index.get((request, position))
        if i is None or self.trace.token[i] < 0:
            return None
        return int(self.trace.token[i])

    def route(self, rows: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(experts [T, K], weights [T, K]) for ``rows`` at model MoE layer ``layer``."""
        tl = self.layer_map[layer]
        return self.trace.experts[rows, tl], self.trace.weights[rows, tl]

    def route_all(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(experts [L, T, K], weights [L, T, K]) for ``rows`` at every model MoE layer."""
        lmap = np.asarray(self.layer_map)
        ex, w = self.trace.experts[rows][:, lmap], self.trace.weights[rows][:, lmap]  # [T, L, K]
        return ex.transpose(1, 0, 2), w.transpose(1, 0, 2)
