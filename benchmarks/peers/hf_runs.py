"""Plain transformers as benchmark peers: every weight on the GPU (``hf-gpu``, the ceiling where it fits) and
accelerate's offload (``hf-accelerate``: ``device_map="auto"`` with ``max_memory`` = the GPU budget of dense weights
plus a fraction of the experts; the layers that do not fit stay in host RAM and are copied in at every forward).

Per batch size: random token-id prompts of ``--prompt`` tokens, greedy ``generate`` with ``min_new_tokens`` =
``max_new_tokens`` (no early stop). Time to first token is a ``max_new_tokens=1`` call; decode time is the full
call minus that, over the generated tokens after the first. Rows go to the peers JSON as each finishes.

    python3 benchmarks/peers/hf_runs.py --model /dev/shm/olmoe --out /tmp/peers.json --system hf-gpu
    python3 benchmarks/peers/hf_runs.py --model /dev/shm/olmoe --out /tmp/peers.json --system hf-accelerate \
        --fractions 0.25,0.125 --gen 16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from pathlib import Path

import torch

from benchmarks.peers.record import add_run, add_skip, set_version
from benchmarks.peers.sizes import checkpoint_sizes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model: torch.nn.Module, ids: torch.Tensor, new: int, device: str) -> float:
    """Seconds of one greedy ``generate`` of exactly ``new`` tokens for every row of ``ids``."""
    mask = torch.ones_like(ids)
    sync(device)
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    sync(device)
    return time.perf_counter() - t0


def load_model(auto: type, path: str, device: str, budget: int | None) -> torch.nn.Module:
    """The checkpoint in bf16: all on ``device`` (``budget`` None), else spread by accelerate over GPU 0 (at most
    ``budget`` bytes) and host RAM."""
    if budget is None:
        return auto.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    return auto.from_pretrained(
        path, dtype=torch.bfloat16, device_map="auto", max_memory={0: budget, "cpu": 400 << 30}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--system", choices=("hf-gpu", "hf-accelerate"), required=True)
    ap.add_argument("--geometry", default="olmoe")
    ap.add_argument(
        "--fractions", default="0.25,0.125", help="hf-accelerate: expert fractions in the GPU budget"
    )
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument(
        "--device", default="cuda", help="hf-gpu only: cpu for a check on a machine without a GPU"
    )
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds after which nothing new starts")
    args = ap.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM

    set_version(args.out, "transformers", transformers.__version__)
    set_version(args.out, "torch", torch.__version__)
    if importlib.util.find_spec("accelerate") is None:
        add_skip(
            args.out, args.system, "accelerate is not installed (transformers needs it for any device_map)"
        )
        return
    import accelerate

    set_version(args.out, "accelerate", accelerate.__version__)
    sizes = checkpoint_sizes(Path(args.model))
    device = args.device if args.system == "hf-gpu" else "cuda"
    if args.system == "hf-gpu":
        budgets = [(1.0, None)]
    else:
        budgets = [(float(f), sizes.budget(float(f))) for f in args.fractions.split(",")]
    for frac, budget in budgets:
        if args.deadline and time.time() > args.deadline - 30:
            add_skip(args.out, args.system, f"fraction {frac}: past the deadline")
            continue
        t0 = time.perf_counter()
        try:
            model = load_model(AutoModelForCausalLM, args.model, device, budget)
        except Exception as e:  # a peer that fails is recorded, not fatal to the other peers
            add_skip(args.out, args.system, f"fraction {frac}: loading failed: {type(e).__name__}: {e}"[:400])
            continue
        load_s = time.perf_counter() - t0
        placed = sorted({str(d) for d in getattr(model, "hf_device_map", {"": device}).values()})
        vocab = model.config.vocab_size
        for batch in [int(b) for b in args.batches.split(",")]:
            if args.deadline and time.time() > args.deadline - 15:
                add_skip(args.out, args.system, f"fraction {frac} batch {batch}: past the deadline")
                continue
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(1, vocab, (batch, args.prompt), generator=gen).to(device)
            try:
                timed_generate(model, ids[:, :16], 2, device)  # warm-up: kernels, allocator
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                first = timed_generate(model, ids, 1, device)
                full = timed_generate(model, ids, args.gen, device)
            except Exception as e:
                add_skip(
                    args.out, args.system, f"fraction {frac} batch {batch}: {type(e).__name__}: {e}"[:400]
                )
                continue
            decode_s = max(full - first, 1e-9)
            tokens = batch * (args.gen - 1)
            peak = torch.cuda.max_memory_reserved() if device.startswith("cuda") else 0
            add_run(
                args.out, system=args.system, geometry=args.geometry, cache_fraction=frac,
                gpu_budget=budget if budget is not None else sizes.dense_bytes + sizes.expert_bytes_total,
                batch=batch, prompt_tokens=args.prompt, ttft_ms=1e3 * first, ms_per_token=1e3 * decode_s / tokens,
                tokens_per_s=tokens / decode_s, step_ms=1e3 * decode_s / (args.gen - 1), generated_tokens=args.gen,
                peak_gpu_bytes=peak, load_s=load_s, devices=placed,
                notes=f"transformers {transformers.__version__} generate, greedy, bf16, the checkpoint's own routing; "
                + ("every weight on the GPU" if budget is None else f"device_map=auto, max_memory GPU {budget} B")
                + "; peak_gpu_bytes = torch max_memory_reserved",
            )  # fmt: skip
        del model
        gc.collect()  # the host copies of offloaded layers go before the next budget loads its own
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
