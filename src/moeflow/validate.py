"""Checks shared by every entry point (CLI, ``LLM``, ``EngineConfig``, ``SamplingParams``): device names, dtypes,
expert backends, numbers in range, prompt token ids against the vocabulary and prompt length against the model's
context. Each check raises a :class:`~moeflow.errors.MoeflowError` subclass with a one-line message that names the
value, the rule and the fix.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from typing import Any

from moeflow.errors import ConfigError, RequestError

DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("auto", "loop", "batched", "grouped", "triton")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(name: Any) -> str:
    """``name`` if it is "auto", "cpu", "cuda" or "cuda:N"."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def check_dtype(name: Any) -> str:
    """``name`` if it is a compute dtype moeflow supports."""
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return name


def check_backend(backend: Any, device: str = "auto") -> str:
    """``backend`` if it names an expert backend that can run on ``device`` with what is installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown expert backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "triton":
        if device == "cpu":
            raise ConfigError(
                "the triton expert backend runs on CUDA only: use --expert-backend auto on a CPU"
            )
        if importlib.util.find_spec("triton") is None:
            raise ConfigError(
                "the triton expert backend needs Triton, which is not installed: pip install triton, "
                "or use --expert-backend auto"
            )
    return backend


def check_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, error: type = ConfigError
) -> int:
    """``value`` if it is an integer (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{name} must be {_range(lo, hi)}, got {value}")
    return value


def check_float(
    name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    error: type = ConfigError,
) -> float:  # fmt: skip
    """``value`` as a float if it is a finite real number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        raise error(f"{name} must be {_range(lo, hi, lo_open)}, got {value:g}")
    return value


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"<= {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"


def prompt_token_ids(prompt: Any, vocab_size: int | None) -> list[int]:
    """A token-id prompt as a list of ints, each in [0, vocab_size)."""
    if isinstance(prompt, (str, bytes)) or (
        not isinstance(prompt, Sequence) and not hasattr(prompt, "tolist")
    ):
        raise RequestError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError(f"token id #{i} of the prompt is {t!r}, not an integer")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise RequestError(
                f"token id {t} (#{i} of the prompt) is outside the vocabulary [0, {vocab_size}): "
                "tokenize with the model's own tokenizer"
            )
    return ids


def context_length(config: Any) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), if its config says."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context(prompt_tokens: int, max_tokens: int, context: int | None) -> None:
    """Refuse a request whose prompt plus ``max_tokens`` does not fit the model's context."""
    if context is not None and prompt_tokens + max_tokens > context:
        hint = (
            f"lower max_tokens to {context - prompt_tokens}, or truncate the prompt (truncate_prompt=True, "
            "--truncate-prompt)"
            if prompt_tokens < context
            else "shorten the prompt, or let it keep its last tokens (truncate_prompt=True, --truncate-prompt)"
        )
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
            f"positions, beyond the model's context of {context}; {hint}"
        )


def check_request(ids: list[int], max_tokens: int, config: Any, truncate: bool = False) -> list[int]:
    """Everything about one admitted prompt that depends on the model: vocabulary and context length. With
    ``truncate``, a prompt too long for its ``max_tokens`` keeps its last tokens instead of being refused."""
    prompt_token_ids(ids, getattr(config, "vocab_size", None))
    context = context_length(config)
    if truncate and context is not None and max_tokens < context and len(ids) + max_tokens > context:
        ids = ids[len(ids) + max_tokens - context :]
    check_context(len(ids), max_tokens, context)
    return ids


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive integer."""
    return check_int("batch_size", batch_size, 1)


def request_ids_of(
    prompt: str | list[int], tokenizer: Any, model_dir: str, config: Any, params: Any
) -> tuple[list[int], str]:
    """(token ids, text) of one request's prompt: text tokenised (a model without tokenizer files takes token ids
    only), ids checked against the vocabulary, and the whole request against the context (``check_request``)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError(f"{model_dir} has no tokenizer files: pass token ids instead of text")
        ids, text = tokenizer(prompt)["input_ids"], prompt
    else:
        ids, text = prompt_token_ids(prompt, config.vocab_size), ""
    if not ids:
        raise RequestError("empty prompt: give at least one token of text")
    return list(check_request(ids, params.max_tokens, config, params.truncate_prompt)), text
