"""Argument parsing shared by the subcommands: a parser whose errors are one line, argparse types that check
ranges (so a bad number fails before any work), ``--option key=value`` parsing and the cache-size flag."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from moeflow.cache_size import CacheSize, parse_cache_size
from moeflow.config import parse_size
from moeflow.errors import MoeflowError


class MoeflowParser(argparse.ArgumentParser):
    """Shows defaults in ``--help`` and reports a bad command line in one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return convert


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(
                f"must be {'above' if lo_open else 'at least'} {lo:g}, got {text}"
            )
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:g}, got {text}")
        return value

    return convert


def size(text: str) -> int:
    """An argparse type: a memory size like 12GiB, 512MB or a byte count."""
    try:
        value = parse_size(text)
    except MoeflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert value is not None
    return value


def cache_size(text: str) -> CacheSize:
    """An argparse type: a cache size (0.25, 25% or 64 slots; see ``moeflow.cache_size``)."""
    try:
        return parse_cache_size(text)
    except MoeflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cache_share(text: str) -> CacheSize:
    """An argparse type: a share of all experts only (0.25 or 25%), for the older ``--cache-fraction``."""
    try:
        return parse_cache_size(text, share_only=True)
    except MoeflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cache_sizes(text: str) -> list[CacheSize]:
    """An argparse type: one cache size or several separated by commas."""
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a cache size, got {text!r}")
    return [cache_size(t) for t in parts]


class RecordFlag(argparse.Action):
    """Store the value and the option string the user typed (``<dest>_flag``), so errors name that flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they are (numbers, true/false), else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoeflowError(f"--option {item!r}: write it as key=value, e.g. --option lookahead=2")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
