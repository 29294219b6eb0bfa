"""Quality of quantised experts on the demo model (CPU), on its held-out code and prose (issue 14).

For every expert format (bf16 = the checkpoint's precision, fp8, int8, int4, int3, int2), with every expert cached:
mean NLL per token over the first ``--tokens`` tokens of each text (one window, teacher forced), the mean KL divergence
of the next-token distributions from bf16's, and the agreement of ``--gen`` greedy tokens after a ``--prompt-tokens``
prompt taken from the text. Miss-only int4 (``--miss-dtype int4``: hits full precision, misses int4) runs at
``--cache`` of the experts cached, and is scored token by token through the KV cache (teacher-forced decode), so
hits and misses happen as in generation; a bf16 run at the same cache size, scored the same way, is the control.

    python benchmarks/quant_quality.py --out benchmarks/results/quant-quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.perplexity import window_logprobs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
TEXTS = {"code": ROOT / "benchmarks/prompts/demo-heldout-code.txt",
         "prose": ROOT / "benchmarks/prompts/demo-heldout-prose.txt"}  # fmt: skip
FORMATS = ("bf16", "fp8", "int8", "int4", "int3", "int2")


@torch.inference_mode()
def decode_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities [n - 1, V], one token per forward step through the KV cache."""
    cache, rows = None, []
    for t in range(len(ids) - 1):
        kw = {"past_key_values": cache} if cache is not None else {}
        out = llm.loaded.model(input_ids=torch.tensor([[ids[t]]]), position_ids=torch.tensor([[t]]), use_cache=True,
                               **kw)  # fmt: skip
        cache = out.past_key_values
        rows.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
    return torch.stack(rows)


def scores(logp: torch.Tensor, ids: list[int], ref: torch.Tensor | None) -> dict:
    target = torch.tensor(ids[1 : len(logp) + 1])
    nll = float(-logp[torch.arange(len(target)), target].double().mean())
    kl = None if ref is None else float((ref.exp() * (ref - logp)).sum(-1).double().mean())
    return {"nll": nll, "kl": kl}


def greedy(llm: LLM, prompt: list[int], n: int) -> list[int]:
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids


def agreement(tokens: list[int], ref: list[int]) -> dict:
    same = [a == b for a, b in zip(tokens, ref, strict=True)]
    first = next((i for i, s in enumerate(same) if not s), len(same))
    return {"greedy_agree": sum(same) / len(same), "greedy_first_diff": first}


def run_config(
    name: str, llm: LLM, texts: dict, args: argparse.Namespace, ref: dict, decode: bool
) -> list[dict]:
    rows = []
    for text, ids in texts.items():
        t0 = time.perf_counter()
        p0 = (llm.policy.stats.hits, llm.policy.stats.misses)
        logp = (
            decode_logprobs(llm, ids)
            if decode
            else window_logprobs(llm.loaded.model, ids, 0, len(ids), llm.device)[:-1]
        )
        hits, misses = llm.policy.stats.hits - p0[0], llm.policy.stats.misses - p0[1]
        row = {"config": name, "text": text, "tokens": len(ids) - 1, "scoring": "decode" if decode else "window",
               **scores(logp, ids, ref.get(text, {}).get("logp")), "hit_ratio": hits / max(hits + misses, 1)}  # fmt: skip
        gen = greedy(llm, ids[: args.prompt_tokens], args.gen)
        if text in ref:
            row.update(agreement(gen, ref[text]["gen"]))
            row["nll_rel"] = row["nll"] / ref[text]["nll"] - 1
        else:
            ref[text] = {"logp": logp, "gen": gen, "nll": row["nll"]}
        row["expert_bytes"] = llm.info.expert_bytes
        row["wall_s"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024, help="tokens scored per text")
    ap.add_argument("--gen", type=int, default=256, help="greedy tokens compared")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--cache", type=float, default=0.25, help="share of experts cached for the miss-only run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    probe = LLM(DEMO, device="cpu", num_slots=8, progress=False)
    tok, total = probe.tokenizer, probe.info.num_layers * probe.info.num_experts
    del probe
    texts = {k: tok(p.read_text(encoding="utf-8"))["input_ids"][: args.tokens + 1] for k, p in TEXTS.items()}
    ref: dict = {}
    rows = []
    for fmt in FORMATS:
        llm = LLM(DEMO, device="cpu", progress=False, expert_dtype=fmt)
        rows += run_config(fmt, llm, texts, args, ref, decode=False)
    slots = int(total * args.cache)
    for name, kw in ((f"bf16 @{args.cache:.0%} cached", {}), (f"miss-only int4 @{args.cache:.0%} cached",
                                                              {"miss_dtype": "int4"})):  # fmt: skip
        llm = LLM(DEMO, device="cpu", num_slots=slots, progress=False, **kw)
        rows += run_config(name, llm, texts, args, ref, decode=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    doc = {"command": " ".join(sys.argv), "commit": commit, "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "transformers": transformers.__version__, "model": "models/demo",
           "compute_dtype": "float32 (the demo's auto dtype on a CPU)", "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
