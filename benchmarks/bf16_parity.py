"""bf16 parity on the demo model: where do moeflow's paths (eager, static, graph) and transformers' own experts
implementations part ways? Prints the last-prompt-token logits' differences, the reference's top-2 margin, and
the first index at which each path's greedy tokens leave transformers'.

    python benchmarks/bf16_parity.py --out /tmp/bf16.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
PROMPTS = ["def fibonacci(n):\n    ", "The history of the city", "import os\nimport sys\n\ndef main():\n"]


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = LLM(DEMO, device="cpu", num_slots=8, decode="eager", progress=False).tokenizer
    rows = []
    refs = {}
    for impl in ("batched_mm", "grouped_mm", "eager"):
        refs[impl] = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16,
                                                          experts_implementation=impl).to("cuda").eval()  # fmt: skip
    llms = {mode: LLM(DEMO, device="cuda", dtype="bfloat16", num_slots=1024, decode=mode, progress=False)
            for mode in ("eager", "static", "graph")}  # fmt: skip
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids], device="cuda")
        row: dict = {"prompt": text}
        with torch.no_grad():
            base = refs["batched_mm"](x).logits[0, -1].float()
            top = base.topk(2).values
            row["ref_top2_margin"] = float(top[0] - top[1])
            for impl, m in refs.items():
                row[f"logits_maxdiff_{impl}"] = float((m(x).logits[0, -1].float() - base).abs().max())
            row["logits_maxdiff_moeflow_eager"] = float(
                (llms["eager"].loaded.model(x).logits[0, -1].float() - base).abs().max()
            )
            full = (
                llms["eager"]
                .loaded.model(x, logits_to_keep=1, attention_mask=torch.ones_like(x))
                .logits[0, -1]
            )
            row["moeflow_keep1_top3"] = full.float().topk(3).indices.tolist()
            row["ref_top3"] = base.topk(3).indices.tolist()
            row["ref_keep1_top3"] = (
                refs["batched_mm"](x, logits_to_keep=1).logits[0, -1].float().topk(3).indices.tolist()
            )
        want = {impl: m.generate(x, max_new_tokens=args.tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist() for impl, m in refs.items()}  # fmt: skip
        for impl in refs:
            row[f"first_diff_ref_{impl}"] = first_diff(want[impl], want["batched_mm"])
        for mode, llm in llms.items():
            got = llm.generate([ids], SamplingParams(max_tokens=args.tokens, ignore_eos=True))[0].token_ids
            row[f"first_diff_{mode}"] = {impl: first_diff(got, w) for impl, w in want.items()}
            row[f"tokens_{mode}"] = got[:6]
        row["tokens_ref"] = want["batched_mm"][:6]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import subprocess
    import sys

    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": " ".join(sys.argv), "commit": commit, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
