"""Errors and warnings moeflow raises for bad input: each names the problem and the fix."""

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


class ConfigError(MoeflowError):
    """An engine setting is out of range or names something that does not exist (device, dtype, backend)."""


class MoeflowWarning(UserWarning):
    """Base class of moeflow's warnings: the run goes on, but probably not as the user meant."""


class BudgetWarning(MoeflowWarning):
    """A memory budget is larger than what the machine has."""


class DistributedError(MoeflowError):
    """A collective between the processes of an expert-parallel run failed: a rank died, stalled or disagreed."""
