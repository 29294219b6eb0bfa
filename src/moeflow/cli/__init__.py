"""The ``moeflow`` console script: one subcommand per job, each defined in a module of this package."""

from __future__ import annotations

import argparse
import importlib
import sys

from moeflow.errors import MoeflowError

# Modules that define subcommands; each has ``register(subparsers)``, whose parsers set ``func``.
COMMAND_MODULES = (
    "moeflow.cli.run",
    "moeflow.cli.traces",
    "moeflow.cli.sim",
    "moeflow.cli.predictor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description="Run MoE models with offloaded experts.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoeflowError as exc:
        print(f"moeflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
