"""CPU expert backends side by side: time to first token of a long prompt and decode time per token, per backend
(``loop``, ``grouped``, ``batched``, ``auto``), at 25% and 100% of the experts cached (the eager path).

    python benchmarks/cpu_backends.py --model models/demo --dtype float32 --prompt 512 --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backends", default="loop,grouped,auto")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(args.prompt)]
    probe = LLM(args.model, device="cpu", dtype=args.dtype, num_slots=8, progress=False)
    total = probe.info.num_layers * probe.info.num_experts
    del probe
    out = {"command": "python " + " ".join(sys.argv), "commit": os.environ.get("MOEFLOW_COMMIT", ""),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}  # fmt: skip
    for backend in args.backends.split(","):
        for frac in (0.25, 1.0):
            llm = LLM(args.model, device="cpu", dtype=args.dtype, num_slots=max(8, int(total * frac)),
                      expert_backend=backend, progress=False)  # fmt: skip
            llm.generate([prompt[:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
            got = llm.generate([prompt], SamplingParams(max_tokens=args.tokens, ignore_eos=True))[0]
            out["runs"].append({"backend": backend, "cache_fraction": frac, "prompt_tokens": len(prompt),
                                "ttft_ms": 1e3 * got.stats.ttft_s, "tpot_ms": 1e3 * got.stats.tpot_s,
                                "token_ids": got.token_ids})  # fmt: skip
            print(json.dumps({k: v for k, v in out["runs"][-1].items() if k != "token_ids"}), flush=True)
            del llm
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
