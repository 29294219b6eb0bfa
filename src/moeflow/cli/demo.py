"""``moeflow demo``: run the bundled demo model with part of its experts cached, then check the offloaded greedy
tokens against the plain (un-offloaded) transformers model on the CPU, and say so in one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moeflow.cli.args import RecordFlag, cache_share, int_at_least, number, size
from moeflow.cli.run import add_cache_size_arg, engine_from_args, stream_one
from moeflow.errors import MoeflowError

DEMO_MODEL = Path(__file__).resolve().parents[3] / "models" / "demo"
DEMO_PROMPTS = ("def fibonacci(n):", "The history of the city")


def reference_tokens(
    model_dir: str, dtype: Any, prompts: list[list[int]], max_tokens: int, eos: set[int], penalty: float = 1.0
) -> list:
    """Greedy continuations of ``prompts`` (with transformers' ``repetition_penalty``) by the transformers model
    with every expert in place (CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    gen = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos) or None, pad_token_id=0,
        repetition_penalty=penalty,
    )  # fmt: skip
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([ids]), generation_config=gen)[0, len(ids) :].tolist()
            for ids in prompts
        ]


def verdict(got: list[list[int]], want: list[list[int]]) -> str:
    """One line: do the offloaded tokens equal the reference's, and if not, where they first differ."""
    n = sum(len(w) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            at = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return f"check: prompt {i + 1} differs from the un-offloaded transformers model at token {at + 1}"
    return f"check: all {n} greedy tokens equal the un-offloaded transformers model's (CPU, same dtype and penalty)"


def cmd_demo(args: argparse.Namespace) -> int:
    from moeflow.sampling import SamplingParams

    model = Path(args.model) if args.model else DEMO_MODEL
    if not (model / "config.json").is_file():
        raise MoeflowError(f"the demo model is missing at {model}; pass --model DIR")
    ns = argparse.Namespace(
        model=str(model), device=args.device, device_memory=args.device_memory, host_memory=None, dtype="auto",
        cache_size=None if args.device_memory is not None else args.cache_size,
        cache_size_flag=getattr(args, "cache_size_flag", None), policy=args.policy, expert_backend="auto",
        batch_size=8, option=[],
    )  # fmt: skip
    with engine_from_args(ns) as llm:
        total = llm.info.num_layers * llm.info.num_experts
        print(f"demo: {model.name}, {llm.store.num_slots} of {total} experts on the device", file=sys.stderr)
        params = SamplingParams(max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty)
        outs = [stream_one(llm, p, params) for p in DEMO_PROMPTS]
        if args.no_check:
            return 0
        ids = [llm.tokenizer(p)["input_ids"] for p in DEMO_PROMPTS]
        want = reference_tokens(
            str(model), llm.loaded.dtype, ids, args.max_tokens, llm.eos_ids, params.repetition_penalty
        )
        line = verdict([o.token_ids for o in outs], want)
        print(line, file=sys.stderr)
        return 0 if line.startswith("check: all") else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the bundled demo model with a quarter of its experts cached")
    p.add_argument("--model", help="another checkpoint instead of the bundled one")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--device-memory", type=size, help="device budget instead of --cache-size, e.g. 2GiB")
    p.add_argument("--policy", default="lru", help="cache policy: lru, lfu, moe-infinity, expertflow, belady")
    add_cache_size_arg(p, default="25%")
    p.add_argument(
        "--cache-fraction", type=cache_share, action=RecordFlag, dest="cache_size", help=argparse.SUPPRESS
    )
    p.add_argument("--max-tokens", type=int_at_least(1), default=48, help="tokens to generate per prompt")
    p.add_argument(
        "--repetition-penalty", type=number(0, lo_open=True), default=1.3,
        help="greedy decoding with this repetition penalty (the check applies the same one in transformers)",
    )  # fmt: skip
    p.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the un-offloaded transformers model"
    )
    p.set_defaults(func=cmd_demo)
