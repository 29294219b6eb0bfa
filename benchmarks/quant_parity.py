"""Graph decode against eager decode with quantised experts, logit by logit: where greedy tokens part, is it a
near tie (the logits differ by rounding and eager's top two are closer than that) or a real difference?

For each ``--expert-dtypes`` format: the demo model (or ``--model``) in ``--dtype`` with ``--num-slots`` slots,
``--tokens`` greedy tokens of one prompt by ``decode="eager"``, then by ``decode="graph"``; each step's logits are
kept. Reported per format: whether the tokens are equal, the first step where they part, the largest |logit
difference| at each step up to it, and eager's top-1 minus top-2 logit at that step. One JSON to ``--out``.

    python3 benchmarks/quant_parity.py --expert-dtypes fp8,int4 --out /tmp/quant-parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def run(llm: LLM, prompt: list[int], tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits [V] of every step (the prefill's first), kept as float32 on the host."""
    kept: list[torch.Tensor] = []
    prefill = llm._eager_forward
    if llm.static is not None:
        decode = llm.static.decode

        def decode_kept(*a: object) -> torch.Tensor:
            out = decode(*a)  # type: ignore[arg-type]
            kept.append(out[0].float().cpu())
            return out

        llm.static.decode = decode_kept  # type: ignore[method-assign]

    def prefill_kept(*a: object) -> torch.Tensor:
        out = prefill(*a)  # type: ignore[arg-type]
        kept.append(out[0].float().cpu())
        return out

    llm._eager_forward = prefill_kept  # type: ignore[method-assign]
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=tokens, ignore_eos=True))
    return out.token_ids, kept


def compare(model: str, fmt: str, dtype: str, slots: int, tokens: int, text: str, device: str) -> dict:
    kw = dict(device=device, dtype=dtype, num_slots=slots, expert_dtype=fmt, progress=False)
    eager = LLM(model, decode="eager", **kw)
    prompt = eager.tokenizer(text)["input_ids"]
    want, want_logits = run(eager, prompt, tokens)
    eager.close()
    graph = LLM(model, decode="graph" if device == "cuda" else "static", **kw)
    got, got_logits = run(graph, prompt, tokens)
    graph.close()
    part = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    upto = len(want) if part is None else part + 1
    diffs = [float((a - b).abs().max()) for a, b in zip(want_logits[:upto], got_logits[:upto])]
    row = {"expert_dtype": fmt, "dtype": dtype, "num_slots": slots, "tokens": tokens, "equal": part is None,
           "first_difference": part, "max_abs_logit_diff_by_step": diffs}  # fmt: skip
    if part is not None:
        top = want_logits[part].topk(2).values
        row["eager_top1_minus_top2_at_difference"] = float(top[0] - top[1])
        row["tokens_at_difference"] = {"eager": want[part], "graph": got[part]}
        row["eager_logit_of_graph_token"] = float(want_logits[part][got[part]])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--expert-dtypes", default="fp8,int4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-slots", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="def fibonacci(n):\n    ")
    ap.add_argument("--device", default="cuda", help="cuda: graph decode; cpu: the static step run eagerly")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers

    rows = []
    for fmt in args.expert_dtypes.split(","):
        rows.append(
            compare(args.model, fmt, args.dtype, args.num_slots, args.tokens, args.prompt, args.device)
        )
        print(json.dumps(rows[-1])[:400], flush=True)
    result = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "commit": os.environ.get("MOEFLOW_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout.strip(),
        "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model,
        "prompt": args.prompt, "runs": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
