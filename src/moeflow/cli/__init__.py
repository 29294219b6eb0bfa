"""The ``moeflow`` console script: one subcommand per job, each defined in a module of this package.

``main`` is the one place errors reach the user: a :class:`~moeflow.errors.MoeflowError` prints one line and exits 2,
anything unexpected prints one line and exits 1 (``MOEFLOW_DEBUG=1`` shows the traceback instead). moeflow's own
warnings print as one line on stderr; other libraries' warnings and log chatter are silenced (shown with
``MOEFLOW_DEBUG=1``), so nothing interleaves with streamed text.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Any

from moeflow import __version__
from moeflow.cli.args import MoeflowParser
from moeflow.errors import MoeflowError, MoeflowWarning

# Modules that define subcommands; each has ``register(subparsers)``, whose parsers set ``func``.
COMMAND_MODULES = (
    "moeflow.cli.run",
    "moeflow.cli.demo",
    "moeflow.cli.traces",
    "moeflow.cli.sim",
    "moeflow.cli.predictor",
    "moeflow.cli.serve",
    "moeflow.cli.quantize",
    "moeflow.cli.perplexity",
)


def build_parser() -> argparse.ArgumentParser:
    parser = MoeflowParser(prog="moeflow", description="Run MoE models with offloaded experts.")
    parser.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=MoeflowParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def debug() -> bool:
    return os.environ.get("MOEFLOW_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    sys.stdout.flush()
    print(f"moeflow: warning: {_one_line(str(message))}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """transformers logs through ``logging``, not ``warnings``: keep it to errors, without its loading bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus N starts again in every rank
    with warnings.catch_warnings():
        if not debug():
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", MoeflowWarning)
            warnings.showwarning = _show_warning
            _quiet_libraries()
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except MoeflowError as exc:
        if debug():
            raise
        print(f"moeflow: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed
        sys.stderr.close()
        return 0
    except Exception as exc:
        if debug():
            raise
        print(
            f"moeflow: internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]} "
            "(run with MOEFLOW_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
