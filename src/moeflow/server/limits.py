"""The longest sequence the server serves (``max_model_len``, as vLLM's ``--max-model-len``): resolving it against
the model's context when the server starts, and refusing a request that needs more positions (a 400 with OpenAI's
code ``context_length_exceeded``)."""

from __future__ import annotations

from moeflow.errors import ConfigError, RequestError

DEFAULT_MAX_MODEL_LEN = 4096
"""The longest sequence served when ``--max-model-len`` is unset, at most the model's context (as llama.cpp's
default ``-c 4096``): the static decode bucket holds ``max_batch`` rows of it from startup, and a 32k-context
model's full context at 8 rows would take tens of GB of KV cache."""


class ContextTooLong(RequestError):
    """A request needs more positions than the server serves (``max_model_len``)."""

    code = "context_length_exceeded"


def resolve_max_model_len(max_model_len: int | None, context: int | None) -> int | None:
    """The longest sequence (prompt plus completion) to serve: ``max_model_len``, at most the model's ``context``;
    unset, ``DEFAULT_MAX_MODEL_LEN`` or the context if shorter (None when the context is unknown: the decode bucket
    then grows as requests need)."""
    if max_model_len is None:
        return None if context is None else min(context, DEFAULT_MAX_MODEL_LEN)
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise ConfigError(f"--max-model-len must be a positive integer, got {max_model_len!r}")
    if context is not None and max_model_len > context:
        raise ConfigError(
            f"--max-model-len {max_model_len} is beyond the model's context of {context} positions "
            f"(max_position_embeddings in config.json): use at most {context}, or leave it unset"
        )
    return max_model_len


def check_length(prompt_tokens: int, max_tokens: int, limit: int | None, context: int | None) -> None:
    """Refuse a request whose prompt plus ``max_tokens`` needs more than ``limit`` positions (the server's
    ``max_model_len``: the model's ``context``, or less)."""
    if limit is None or prompt_tokens + max_tokens <= limit:
        return
    what = f"the model's context of {limit}"
    if limit != context:
        known = f"; the model's context is {context}" if context else ""
        what = f"this server's limit of {limit} (--max-model-len{known})"
    hint = (f"lower max_tokens to {limit - prompt_tokens}" if prompt_tokens < limit
            else f"shorten the prompt to fewer than {limit} tokens")  # fmt: skip
    raise ContextTooLong(
        f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
        f"positions, beyond {what}; {hint}"
    )
