"""Greedy and sampled continuations of held-out prompts by a trained checkpoint (for the model card).

Takes the first ``--per-file`` prompts of each prompt file, keeps their last ``--context-chars`` characters (cut at
a line start), and continues them greedily and by sampling (temperature 0.8, top-k 40, fixed seed) with
transformers' ``generate`` on the CPU. Writes ``--json``.

Usage: ``python training/samples.py --model models/demo --prompts benchmarks/prompts/demo-heldout-code.txt
benchmarks/prompts/demo-heldout-prose.txt --json benchmarks/results/demo-train-samples.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow.cli.prompts import read_prompts


def tail(text: str, chars: int) -> str:
    """The last ``chars`` characters of ``text``, starting at a line start where one exists."""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    nl = cut.find("\n")
    return cut[nl + 1 :] if 0 <= nl < len(cut) - 1 else cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--prompts", nargs="+", required=True)
    ap.add_argument("--per-file", type=int, default=2)
    ap.add_argument("--context-chars", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    results = []
    for path in args.prompts:
        for prompt in read_prompts(path)[: args.per_file]:
            context = tail(prompt, args.context_chars)
            ids = tok(context, return_tensors="pt").input_ids  # [1, S]
            for mode, kw in (
                ("greedy", {"do_sample": False}),
                ("sampled", {"do_sample": True, "temperature": 0.8, "top_k": 40}),
            ):
                torch.manual_seed(args.seed)
                with torch.no_grad():
                    out = model.generate(
                        ids, max_new_tokens=args.max_new_tokens, pad_token_id=tok.eos_token_id, **kw
                    )
                text = tok.decode(out[0, ids.shape[1] :])
                results.append(
                    {"file": Path(path).name, "mode": mode, "context": context, "continuation": text}
                )
                print(f"--- {Path(path).name} [{mode}]\n{context}⟨⟨{text}⟩⟩\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "samples": results}, indent=1, ensure_ascii=False)
        )


if __name__ == "__main__":
    main()
