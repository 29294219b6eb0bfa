"""``moeflow perplexity``: mean NLL per token and perplexity of a text file (``moeflow.engine.perplexity``)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from moeflow.cli.args import int_at_least
    from moeflow.cli.run import add_engine_args

    p = sub.add_parser("perplexity", help="mean NLL per token and perplexity over a text file")
    add_engine_args(p)
    p.add_argument("--file", required=True, help="text file to score (UTF-8)")
    p.add_argument(
        "--context", type=int_at_least(2), default=512, help="tokens per window (at most the model's)"
    )
    p.add_argument(
        "--stride", type=int_at_least(1), help="tokens between window starts (default: context / 2)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with nll, ppl and tokens")
    p.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moeflow.cli.run import engine_from_args
    from moeflow.engine.perplexity import perplexity
    from moeflow.errors import RequestError
    from moeflow.validate import context_length

    path = Path(args.file)
    if not path.is_file():
        raise RequestError(f"--file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    llm = engine_from_args(args)
    if llm.tokenizer is None:
        raise RequestError(f"{args.model} has no tokenizer files: perplexity needs the model's tokenizer")
    limit = context_length(llm.loaded.config)
    context = min(args.context, limit) if limit else args.context
    stride = args.stride or max(context // 2, 1)
    if stride > context:
        raise RequestError(f"--stride {stride} is larger than the context of {context} tokens: lower it")
    ids = llm.tokenizer(text)["input_ids"]
    result = perplexity(llm.loaded.model, ids, context, stride, llm.device)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"nll {result.nll:.4f}  ppl {result.ppl:.3f}  over {result.tokens} tokens "
              f"(windows of {context}, stride {stride})")  # fmt: skip
    return 0
