"""Errors moeflow raises for bad input: each names the problem and the fix."""

from __future__ import annotations


class MoeflowError(Exception):
    """Base class: a user-facing error whose message says what went wrong and what to do."""


class CheckpointError(MoeflowError):
    """A checkpoint directory is missing files, has a truncated shard, or disagrees with its config."""


class UnsupportedModelError(MoeflowError):
    """The checkpoint's architecture is not one moeflow can offload."""


class BudgetError(MoeflowError):
    """A memory budget is too small for what must be resident."""


class RequestError(MoeflowError):
    """A generation request is malformed (empty prompt, bad sampling parameters...)."""


class TraceError(MoeflowError):
    """A routing trace file is malformed or does not fit the model it is used with."""
