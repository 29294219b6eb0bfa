"""Quality of quantised experts on the demo model (CPU), on its held-out code and prose (issue 14).

For every expert format (bf16 = the checkpoint's precision, fp8, int8, int4, int3, int2), with every expert cached:
mean NLL per token over the first ``--tokens`` tokens of each text (one window, teacher forced), the mean KL divergence
of the next-token distributions from bf16's, and the agreement of ``--gen`` greedy tokens after a ``--prompt-tokens``
prompt taken from the text. The two texts run as one batch of two rows (scoring and generation). Miss-only int4
(``--miss-dtype int4``: hits full precision, misses int4) runs at ``--cache`` of the experts cached, and is scored
token by token through the KV cache (teacher-forced decode), so hits and misses happen as in generation (its KL and
NLL are against bf16 scored in one window, which computes the same function). The JSON is rewritten after every
configuration, so a run stopped early keeps what it measured.

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

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
TEXTS = {"code": ROOT / "benchmarks/prompts/demo-heldout-code.txt",
         "prose": ROOT / "benchmarks/prompts/demo-heldout-prose.txt"}  # fmt: skip


@torch.inference_mode()
def window_batch(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, n - 1, V] of every row of ``ids`` [B, n], one forward pass (teacher forced)."""
    return torch.log_softmax(llm.loaded.model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


@torch.inference_mode()
def decode_batch(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    """The same, one token per forward step through the KV cache (hits and misses as in generation)."""
    cache, rows = None, []
    for t in range(ids.shape[1] - 1):
        kw = {"past_key_values": cache} if cache is not None else {}
        pos = torch.full((ids.shape[0], 1), t)
        out = llm.loaded.model(input_ids=ids[:, t : t + 1], position_ids=pos, use_cache=True, **kw)
        cache = out.past_key_values
        rows.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
    return torch.stack(rows, dim=1)


def run_config(
    name: str, llm: LLM, texts: dict, args: argparse.Namespace, ref: dict, decode: bool
) -> list[dict]:
    """Both texts as one batch of two rows (scoring and greedy generation)."""
    t0 = time.perf_counter()
    names = list(texts)
    ids = torch.tensor([texts[k] for k in names])  # [2, tokens + 1]
    p0 = (llm.policy.stats.hits, llm.policy.stats.misses)
    logp = decode_batch(llm, ids) if decode else window_batch(llm, ids)
    hits, misses = llm.policy.stats.hits - p0[0], llm.policy.stats.misses - p0[1]
    params = SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True)
    gens = [o.token_ids for o in llm.generate([texts[k][: args.prompt_tokens] for k in names], params)]
    rows = []
    for i, text in enumerate(names):
        target = ids[i, 1:]
        nll = float(-logp[i, torch.arange(len(target)), target].double().mean())
        row = {"config": name, "text": text, "tokens": len(target), "scoring": "decode" if decode else "window",
               "nll": nll, "scoring_hit_ratio": hits / max(hits + misses, 1), "expert_bytes": llm.info.expert_bytes}  # fmt: skip
        if text in ref:
            r = ref[text]
            row["nll_rel"] = nll / r["nll"] - 1
            row["kl"] = float((r["logp"].exp() * (r["logp"] - logp[i])).sum(-1).double().mean())
            same = [a == b for a, b in zip(gens[i], r["gen"], strict=True)]
            row["greedy_agree"] = sum(same) / len(same)
            row["greedy_first_diff"] = next((j for j, s in enumerate(same) if not s), len(same))
        else:
            ref[text] = {"logp": logp[i], "gen": gens[i], "nll": nll}
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
    ap.add_argument("--formats", default="bf16,int4,fp8,int2,int3,int8", help="in run order; bf16 first")
    ap.add_argument("--miss", action=argparse.BooleanOptionalAction, default=True, help="run miss-only int4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    probe = LLM(DEMO, device="cpu", num_slots=8, progress=False)
    tok, total = probe.tokenizer, probe.info.num_layers * probe.info.num_experts
    del probe
    texts = {k: tok(p.read_text(encoding="utf-8"))["input_ids"][: args.tokens + 1] for k, p in TEXTS.items()}
    ref: dict = {}
    rows: list[dict] = []
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    doc = {"command": " ".join(sys.argv), "commit": commit, "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "transformers": transformers.__version__, "model": "models/demo",
           "compute_dtype": "float32 (the demo's auto dtype on a CPU)", "rows": rows}  # fmt: skip
    slots = int(total * args.cache)
    configs = [(fmt, {"expert_dtype": fmt}, False) for fmt in args.formats.split(",")]
    if args.miss:
        configs.insert(min(2, len(configs)), (f"miss-only int4 @{args.cache:.0%} cached",
                                              {"num_slots": slots, "miss_dtype": "int4"}, True))  # fmt: skip
    for name, kw, decode in configs:  # bf16 first: the reference
        llm = LLM(DEMO, device="cpu", progress=False, **kw)
        rows += run_config(name, llm, texts, args, ref, decode=decode)
        del llm
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")  # after every configuration


if __name__ == "__main__":
    main()
