"""The step-level API of ``BatchEngine`` (``add`` / ``step`` / ``abort``) for models continuous batching cannot
hold (linear attention, state-space layers: their state is not keys and values in rows): one request at a time,
each ``step`` one token of it through ``LLM.stream``."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from moeflow.engine.batch import StepOutput
from moeflow.sampling import SamplingParams
from moeflow.sequence import Sequence, StreamDelta


class SerialEngine:
    """Runs waiting requests one after another, a token per ``step``."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.waiting: OrderedDict[int, tuple[Sequence, float]] = OrderedDict()
        self.running: dict[int, Iterator[StreamDelta]] = {}
        self._queued = 0.0
        """How long the running request waited before it started."""

    def add(self, prompt: str | list[int], params: SamplingParams, request_id: int | None = None,
            arrival: float | None = None) -> int:  # fmt: skip
        (seq,) = self.llm._admit([prompt], params, None if request_id is None else [request_id])
        self.waiting[seq.request_id] = (seq, arrival if arrival is not None else time.perf_counter())
        return seq.request_id

    def abort(self, request_id: int) -> bool:
        if self.waiting.pop(request_id, None) is not None:
            return True
        stream = self.running.pop(request_id, None)
        if stream is None:
            return False
        stream.close()  # type: ignore[attr-defined]
        self.llm.runtime.policy.end_request(request_id)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[StepOutput]:
        if not self.running and self.waiting:
            rid, (seq, arrival) = self.waiting.popitem(last=False)
            self._queued = time.perf_counter() - arrival
            self.running[rid] = self.llm.stream(seq.prompt_ids, seq.params)
        for rid, stream in list(self.running.items()):
            delta = next(stream)
            out = delta.output
            if delta.finished:
                del self.running[rid]
                assert out is not None
                stats = replace(out.stats, ttft_s=out.stats.ttft_s + self._queued)
                out = replace(out, request_id=rid, stats=stats)
            return [StepOutput(rid, delta.token_id, delta.text, delta.finished, out)]
        return []
