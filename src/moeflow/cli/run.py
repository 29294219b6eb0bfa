"""``moeflow generate``, ``moeflow info`` and ``moeflow demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moeflow.config import EngineConfig, format_size, parse_size

DEMO_MODEL = Path(__file__).resolve().parents[3] / "models" / "demo"
DEMO_PROMPTS = ("def fibonacci(n):", "The history of the city")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs the engine."""
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format, safetensors)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-memory", help="device budget, e.g. 12GiB (default: what is free)")
    p.add_argument(
        "--host-memory", help="host RAM for the expert pool, e.g. 64GiB (default: all experts if they fit)"
    )
    p.add_argument("--num-slots", type=int, help="force the number of device expert slots")
    p.add_argument("--policy", default="lru", help="cache policy: lru, lfu, moe-infinity, expertflow, ...")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--expert-backend", default="auto", help="auto, loop, batched, grouped or triton")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)"
    )


def engine_from_args(args: argparse.Namespace, **kwargs: object):
    from moeflow.engine import LLM

    extra = dict(kv.split("=", 1) for kv in args.option)
    cfg = EngineConfig(
        device=args.device,
        device_memory=args.device_memory,
        host_memory=args.host_memory,
        num_slots=args.num_slots,
        policy=args.policy,
        dtype=args.dtype,
        expert_backend=args.expert_backend,
        progress=sys.stderr.isatty(),
        extra=extra,
    )
    return LLM(args.model, config=cfg, batch_size=args.batch_size, **kwargs)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)


def sampling_from_args(args: argparse.Namespace):
    from moeflow.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    llm = engine_from_args(args)
    prompts = list(args.prompt)
    if args.prompts:
        from moeflow.cli.prompts import read_prompts

        prompts += read_prompts(args.prompts)
    if not prompts:
        from moeflow.errors import RequestError

        raise RequestError("give --prompt TEXT or --prompts FILE")
    params = sampling_from_args(args)
    if args.json:
        outs = llm.generate(prompts, params)
        objs = [o.to_dict() for o in outs]
        print(json.dumps(objs[0] if len(objs) == 1 else objs))
        return 0
    for prompt in prompts:
        print(prompt, end="", flush=True)
        last = None
        for delta in llm.stream(prompt, params):
            print(delta.text, end="", flush=True)
            last = delta.output
        print()
        if last is not None:
            s = last.stats
            print(
                f"[{len(last.token_ids)} tokens, {s.tokens_per_s:.1f} tok/s, TTFT {s.ttft_s * 1e3:.0f} ms, "
                f"hit ratio {s.hit_ratio:.2f}, {format_size(s.bytes_to_device)} to device, "
                f"stalled {s.stall_s * 1e3:.0f} ms]",
                file=sys.stderr,
            )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from moeflow.model.describe import describe
    from moeflow.model.loader import open_model

    lm = open_model(
        args.model, torch.device("cpu") if args.device == "cpu" else torch.device("meta"), args.dtype
    )
    total = len(lm.layers) * lm.num_experts
    info = describe(lm)
    if args.device_memory:
        budget = parse_size(args.device_memory)
        free = budget - lm.dense_bytes - max(budget // 20, 64 * 2**20)
        info["device_memory"] = budget
        info["expert_slots_fit"] = max(0, min(total, free // lm.expert_bytes))
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        shown = (
            format_size(value)
            if key.endswith("bytes") or key.endswith("_total") or key == "device_memory"
            else value
        )
        if key == "bytes_per_expert":
            shown = format_size(value)
        print(f"{key:>20}: {shown}")
    if "expert_slots_fit" in info:
        print(f"{'':>20}  ({info['expert_slots_fit']} of {total} experts fit beside the dense weights)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else DEMO_MODEL
    if not (model / "config.json").is_file():
        from moeflow.errors import MoeflowError

        raise MoeflowError(f"the demo model is missing at {model}; pass --model DIR")
    ns = argparse.Namespace(
        model=str(model), device=args.device, device_memory=args.device_memory, host_memory=None, num_slots=None,
        policy=args.policy, dtype="auto", expert_backend="auto", batch_size=8, option=[], prompt=list(DEMO_PROMPTS),
        prompts=None, json=False, max_tokens=args.max_tokens, temperature=0.0, top_k=0, top_p=1.0, stop=[], seed=None,
    )  # fmt: skip
    if ns.device_memory is None and args.cache_fraction:
        from moeflow.model.loader import open_model

        lm = open_model(str(model), torch.device("cpu"), "auto")
        slots = max(lm.top_k, int(len(lm.layers) * lm.num_experts * args.cache_fraction))
        ns.num_slots = slots
        print(
            f"demo: {model.name}, {slots} of {len(lm.layers) * lm.num_experts} experts on the device",
            file=sys.stderr,
        )
    return cmd_generate(ns)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with experts offloaded")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", help="prompt file: one per line (\\n for line breaks) or .jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="architecture, experts and what fits in a budget")
    p.add_argument("--model", required=True)
    p.add_argument("--device-memory", help="show how many experts fit in this device budget")
    p.add_argument("--device", default="meta", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the bundled demo model with a quarter of its experts cached")
    p.add_argument("--model", help="another checkpoint instead of the bundled one")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-memory")
    p.add_argument("--policy", default="lru")
    p.add_argument("--cache-fraction", type=float, default=0.25, help="share of experts given device slots")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
