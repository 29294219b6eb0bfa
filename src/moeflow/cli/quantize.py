"""``moeflow quantize``: write a checkpoint with quantised experts (``moeflow.model.write_quantised``)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a checkpoint whose experts are stored quantised")
    p.add_argument("--model", required=True, help="full-precision checkpoint directory")
    p.add_argument("--expert-dtype", required=True, choices=("fp8", "int8", "int4", "int3", "int2"),
                   help="format of the experts (group-wise, fitted without calibration data)")  # fmt: skip
    p.add_argument(
        "--out", required=True, help="directory to write (refused when it exists and is not empty)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moeflow.model.write_quantised import check_out, quantise_checkpoint

    check_out(Path(args.out), args.force)  # before any work
    out = quantise_checkpoint(args.model, args.out, args.expert_dtype, args.force, sys.stderr.isatty())
    print(f"wrote {out} (experts as {args.expert_dtype})")
    return 0
