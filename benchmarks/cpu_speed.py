"""CPU decode speed in bfloat16 against float32 (issue 10's question: what does keeping a bf16 checkpoint in bf16 on
a CPU cost?): the demo model at 25% of its experts cached and with all of them, and any other checkpoints given.

    python benchmarks/cpu_speed.py --out benchmarks/results/cpu-speed.json [--model DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
PROMPTS = [[5, 17, 42, 7, 99, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]]


def decode_rate(model: str, dtype: str, fraction: float, tokens: int) -> dict:
    probe = LLM(model, device="cpu", dtype=dtype, num_slots=8, progress=False)
    total = probe.info.num_layers * probe.info.num_experts
    del probe
    llm = LLM(model, device="cpu", dtype=dtype, num_slots=max(8, int(total * fraction)), progress=False)
    llm.generate(PROMPTS, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in out)
    return {"model": Path(model).name, "dtype": dtype, "cache_fraction": fraction, "slots": llm.store.num_slots,
            "tokens": n, "wall_s": wall, "tokens_per_s": n / wall, "ttft_s": out[0].stats.ttft_s,
            "decode_ms_per_step": 1e3 * out[0].stats.tpot_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", action="append", default=[], help="more checkpoints (the demo model always runs)"
    )
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    rows = []
    for model in [str(DEMO), *args.model]:
        for fraction in (0.25, 1.0):
            for dtype in ("float32", "bfloat16"):
                rows.append(decode_rate(model, dtype, fraction, args.tokens))
                print(json.dumps(rows[-1]), flush=True)
    doc = {"command": " ".join(sys.argv), "device": f"cpu: {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores", "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "runs": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
