"""``moeflow generate`` and ``moeflow info``, and the engine and sampling flags other commands share."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moeflow.cli.args import RecordFlag, cache_size, int_at_least, number, parse_options, size
from moeflow.config import EngineConfig, format_size
from moeflow.errors import ConfigError
from moeflow.quant.formats import EXPERT_DTYPES, MISS_DTYPES
from moeflow.validate import BACKENDS, DTYPES


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Where the model is and where it computes."""
    p.add_argument(
        "--model", required=required, help="checkpoint directory (Hugging Face format, safetensors)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: the checkpoint's)")


def add_cache_size_arg(
    p: argparse.ArgumentParser, default: str | None = None, aliases: tuple[str, ...] = ("--num-slots",)
) -> None:
    """``--cache-size``, and hidden older spellings of the same flag (``--num-slots``, ``--cache-fraction``)."""
    kw: dict[str, Any] = dict(type=cache_size, action=RecordFlag, dest="cache_size")
    p.add_argument(
        "--cache-size", default=cache_size(default) if default else None, **kw,
        help="device expert slots, all MoE layers together: a share of all experts (0.25 or 25%%) or a slot "
        "count (64); default: what --device-memory allows",
    )  # fmt: skip
    for alias in aliases:
        p.add_argument(alias, help=argparse.SUPPRESS, **kw)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """``--expert-dtype`` and ``--miss-dtype`` (see ``EngineConfig``)."""
    p.add_argument(
        "--expert-dtype", default="auto", choices=EXPERT_DTYPES,
        help="form of the experts in host RAM and device slots: bf16 (full precision), fp8, int8, int4, int3, "
        "int2 (quantised at load), auto (as the checkpoint stores them)",
    )  # fmt: skip
    p.add_argument(
        "--miss-dtype", default="none", choices=MISS_DTYPES,
        help="a miss computes with this low-precision copy, hits with the full-precision slot (none: off)",
    )  # fmt: skip


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs the engine."""
    add_model_args(p)
    p.add_argument("--device-memory", type=size, help="device budget, e.g. 12GiB (default: what is free)")
    p.add_argument("--host-memory", type=size, help="host RAM for the expert pool, e.g. 64GiB (default: all experts if they fit)")  # fmt: skip
    add_cache_size_arg(p)
    p.add_argument("--policy", default="lru", help="cache policy: lru, lfu, moe-infinity, expertflow, belady")
    p.add_argument("--expert-backend", default="auto", choices=BACKENDS, help="expert compute over the slots")
    add_quant_args(p)
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences decoded together")
    p.add_argument(
        "--decode", default="auto", choices=("auto", "graph", "static", "eager"),
        help="decode steps: graph (one captured CUDA graph per step, misses read from pinned host memory), "
        "static (the same step, not captured), eager (host work per layer); auto: graph on a GPU whose host "
        "pool holds every expert, else eager",
    )  # fmt: skip
    p.add_argument(
        "--no-cuda-graphs", dest="decode", action="store_const", const="eager",
        help="decode eagerly (same as --decode eager; for debugging)",
    )  # fmt: skip
    p.add_argument(
        "--prefill", default="auto", choices=("auto", "slots", "eager"),
        help="prompts of a static/graph decoder: slots (the MoE layers through the slot table, no host sync inside "
        "the prefill), eager (the policy loads before each layer); auto: slots on a GPU whose pool holds every expert",
    )  # fmt: skip
    p.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=True,
        help="launch each static decode step before the last one is settled, where it can be known (greedy, every "
        "expert in a slot): the host's work between steps overlaps the GPU's; same outputs (default: on; "
        "--no-overlap settles each step first)",
    )  # fmt: skip
    p.add_argument(
        "--overlap-offloaded", action=argparse.BooleanOptionalAction, default=True,
        help="with --overlap, also launch offloaded decode steps ahead, on a cache plan made one step behind; same "
        "outputs (default: on; --no-overlap-offloaded settles each offloaded step first)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the static decode step before capturing it (default: on with CUDA graphs)",
    )  # fmt: skip
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    p.add_argument(
        "--gpus", type=int_at_least(1), default=1,
        help="processes, one per GPU, sharing one expert cache (each expert homed on one; --cache-size and "
        "--device-memory per GPU); with --device cpu, CPU processes. Several hosts: torchrun -m moeflow",
    )  # fmt: skip


def slots_from_args(args: argparse.Namespace) -> int | None:
    """``--cache-size`` resolved against the model's expert count (None: let the budget decide)."""
    if args.cache_size is None:
        return None
    import torch

    from moeflow.model.loader import open_model

    lm = open_model(args.model, torch.device("meta"))
    flag = getattr(args, "cache_size_flag", None) or "--cache-size"
    return args.cache_size.slots(len(lm.layers) * lm.num_experts, lm.top_k, flag)


def engine_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    from moeflow.engine import LLM

    cfg = EngineConfig(
        device=args.device,
        device_memory=args.device_memory,
        host_memory=args.host_memory,
        num_slots=slots_from_args(args),
        policy=args.policy,
        dtype=args.dtype,
        expert_backend=args.expert_backend,
        decode=getattr(args, "decode", "auto"),
        compile=getattr(args, "compile", None),
        overlap=getattr(args, "overlap", True),
        overlap_offloaded=getattr(args, "overlap_offloaded", True),
        prefill=getattr(args, "prefill", "auto"),
        expert_dtype=getattr(args, "expert_dtype", "auto"),
        miss_dtype=getattr(args, "miss_dtype", "none"),
        progress=sys.stderr.isatty(),
        extra=parse_options(args.option),
    )
    from moeflow.distributed.group import world_size_from_env

    if (
        world_size_from_env() > 1 or getattr(args, "gpus", 1) > 1
    ):  # one rank of torchrun's (or --gpus') processes
        if getattr(args, "command", None) != "generate":
            raise ConfigError(
                f"moeflow {args.command} runs in one process: several processes (torchrun, --gpus) serve "
                "moeflow generate so far; drop --gpus"
            )
        from moeflow.distributed.engine import parallel_llm

        return parallel_llm(args.model, cfg, batch_size=args.batch_size, **kwargs)
    return LLM(args.model, config=cfg, batch_size=args.batch_size, **kwargs)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    p.add_argument(
        "--max-tokens", type=int_at_least(1), default=max_tokens, help="tokens to generate at most"
    )
    p.add_argument("--temperature", type=number(0), default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0, help="nucleus sampling mass")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="sampler seed (default: unseeded)")
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="a prompt too long for the context with --max-tokens keeps its last tokens (default: refused)",
    )
    p.add_argument(
        "--repetition-penalty", type=number(0, lo_open=True), default=1.0,
        help="divide the scores of tokens already in the text by this (1: off; as transformers does)",
    )  # fmt: skip


def sampling_from_args(args: argparse.Namespace) -> Any:
    from moeflow.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=getattr(args, "repetition_penalty", 1.0),
        truncate_prompt=getattr(args, "truncate_prompt", False),
        stop=tuple(args.stop),
        seed=args.seed,
    )


def stream_one(llm: Any, prompt: str, params: Any) -> Any:
    """Print ``prompt`` and its continuation as it is generated, then a stats line on stderr; the output."""
    print(prompt, end="", flush=True)
    last = None
    for delta in llm.stream(prompt, params):
        print(delta.text, end="", flush=True)
        last = delta.output or last
    print(flush=True)
    if last is not None:
        s = last.stats
        print(
            f"[{len(last.token_ids)} tokens, {s.tokens_per_s:.1f} tok/s, TTFT {s.ttft_s * 1e3:.0f} ms, "
            f"hit ratio {s.hit_ratio:.2f}, {format_size(s.bytes_to_device)} to device, "
            f"stalled {s.stall_s * 1e3:.0f} ms]",
            file=sys.stderr,
            flush=True,
        )
    return last


def cmd_generate(args: argparse.Namespace) -> int:
    from moeflow.errors import RequestError

    prompts = list(args.prompt)
    if args.prompts:
        from moeflow.cli.prompts import read_prompts

        prompts += read_prompts(args.prompts)
    if not prompts:
        raise RequestError("give --prompt TEXT or --prompts FILE")
    if any(not p for p in prompts):
        raise RequestError("empty prompt: give at least one character of text")
    params = sampling_from_args(args)
    from moeflow.distributed.group import world_size_from_env

    if args.gpus > 1 and world_size_from_env() == 1:
        from moeflow.distributed.launch import check_devices, launch

        check_devices(args.gpus, args.device)
        return launch(args.gpus, args.argv)
    with engine_from_args(args) as llm:  # closing lets the policy save what it learned
        leader = getattr(llm, "group", None) is None or llm.group.leader  # several ranks: rank 0 prints
        if args.json:
            for prompt, out in zip(prompts, llm.generate(prompts, params)):
                if leader:
                    print(json.dumps({"prompt": prompt, **out.to_dict()}), flush=True)
            return 0
        for prompt in prompts:
            if leader:
                stream_one(llm, prompt, params)
            else:  # the same steps as rank 0, silently
                for _ in llm.stream(prompt, params):
                    pass
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from moeflow.memory import default_kv_reserve
    from moeflow.model.describe import describe
    from moeflow.model.loader import open_model
    from moeflow.validate import check_device

    name = check_device(args.device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    lm = open_model(args.model, torch.device(name), args.dtype)  # built on meta: nothing but headers is read
    total = len(lm.layers) * lm.num_experts
    info = {**describe(lm), "device": name}
    if args.device_memory is not None:
        budget = args.device_memory
        reserve = default_kv_reserve(budget, name.startswith("cuda"))
        info["device_memory"] = budget
        info["expert_slots_fit"] = max(0, min(total, (budget - lm.dense_bytes - reserve) // lm.expert_bytes))
    if args.json:
        print(json.dumps(info))
        return 0
    sized = ("bytes_per_expert", "expert_bytes_total", "dense_bytes", "device_memory")
    for key, value in info.items():
        print(f"{key:>20}: {format_size(value) if key in sized else value}")
    if "expert_slots_fit" in info:
        print(f"{'':>20}  ({info['expert_slots_fit']} of {total} experts fit beside the dense weights)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with experts offloaded")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", help="prompt file: one per line (\\n for line breaks) or .jsonl")
    p.add_argument(
        "--json", action="store_true",
        help="print JSON Lines: one object per prompt with prompt, text, token_ids, finish_reason and stats",
    )  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="architecture, experts and what fits in a budget")
    add_model_args(p)
    p.add_argument("--device-memory", type=size, help="show how many experts fit in this device budget")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.set_defaults(func=cmd_info)
