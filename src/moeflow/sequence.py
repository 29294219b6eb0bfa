"""One request's state while it generates: token ids, text, stop conditions, finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeflow.metrics import Stats
from moeflow.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: int
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """"length", "stop" (a stop string), "eos", or None while running."""
    emitted: int = 0
    """Characters of ``text`` already handed to a stream."""
    detok: Any = None
    """The engine's incremental detokeniser of ``output_ids`` (``moeflow.detok.IncrementalText``)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Position of the next input token (the last generated one)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(self, token: int, text: str, eos_ids: set[int]) -> None:
        """Add a sampled token whose decoded output so far is ``text`` (the previous text, extended); settle finish
        conditions. Stop strings are searched only where they could newly end: the new tail, and the last
        ``len(stop) - 1`` characters before it."""
        longest = max((len(s) for s in self.params.stop), default=1)
        start = max(0, len(self.text) - longest + 1)
        self.output_ids.append(token)
        self.text = text
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
        cut = min((i for i in (text.find(s, start) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.finish_reason = "stop"
        elif self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def stream_delta(self) -> str:
        """New text safe to emit: while running, hold back a tail that could start a stop string."""
        hold = 0 if self.finished else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt."""

    request_id: int
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: Stats

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


@dataclass
class StreamDelta:
    """One streaming event: new text (possibly empty) and the token that produced it."""

    request_id: int
    text: str
    token_id: int
    finished: bool
    output: RequestOutput | None = None
    """Set on the last event."""
