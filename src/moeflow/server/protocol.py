"""The OpenAI wire format the server speaks: pydantic request schemas (validated on arrival), the response and
stream-chunk bodies, the OpenAI-style error body, and the mapping from a request to engine sampling settings.

Only the fields moeflow honours are declared; other OpenAI fields (``user``, ``frequency_penalty``...) are accepted
and ignored, except those whose silent loss would change the answer (``n`` > 1, ``logprobs``, ``best_of``), which
are refused with a 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Engine finish reasons -> OpenAI's."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """The served model's name (default: the one model served)."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """moeflow extension (0: off)."""
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float = Field(1.0, gt=0)
    """moeflow extension (1: off)."""
    ignore_eos: bool = False
    """moeflow extension."""
    logprobs: Any = None
    best_of: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: moeflow serve returns one choice per request (n=1)")
        return n

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("best_of is not supported (give best_of=1 or leave it out)")
        return best_of

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: Any) -> Any:
        if logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported by moeflow serve yet")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return stop

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """Keyword arguments of ``SamplingParams`` (``max_tokens`` None: fill the context, decided later)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(stops),
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] = Field(
        description="text, token ids, or a list of one text (several prompts per request are not supported)"
    )
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_type(cls, prompt: Any) -> Any:
        if not isinstance(prompt, str | list):
            raise ValueError("prompt must be text, a list of token ids, or a list of one text")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is supported, got a list of {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("empty prompt: give at least one character of text or one token id")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for ``max_tokens``; either may be given (default: the rest of the context)."""

    def dialogue(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(engine_reason: str | None) -> str | None:
    return FINISH_REASONS.get(engine_reason or "", engine_reason)


def completion_body(
    rid: str, model: str, text: str, reason: str | None, use: dict | None, created: int | None = None
) -> dict[str, Any]:
    """A ``text_completion`` object: a whole response (``use`` set) or one stream chunk."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, str], reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}],
    }


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
