"""Train moeflow's bundled demo model: an OLMoE-family MoE LM with OLMoE-1B-7B's routing shape (16 x 64 experts, top-8).

Owns the model recipe (``model_config``), the per-layer Switch-style load-balancing loss and router z-loss
(``routing_losses``), the training step (``train_step``), held-out evaluation per domain, and saving the bf16
checkpoint with its tokenizer. Every hyper-parameter is a CLI flag; all of them, the seed, library versions and
the data recipe (``DATA/manifest.json``, ``DATA/tokens/stats.json``) are echoed into the log and the JSON result.

Usage (after ``prepare_corpus.py`` and ``train_tokenizer.py``)::

    python training/train_demo.py --data .data/demo --tokenizer models/demo --out models/demo \
        --json benchmarks/results/demo-train-h100.json --log benchmarks/results/demo-train.log
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

SAMPLE_PROMPTS = ("def read_config(path):\n", "import os\nimport sys\n\n", "HAMLET.\n", "The history of the ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/demo")
    ap.add_argument("--tokenizer", default="models/demo")
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--json", default=None, help="result JSON path")
    ap.add_argument("--log", default=None, help="log file path (also printed)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--experts-impl", default="grouped_mm", help="grouped_mm, batched_mm or eager (first that runs)"
    )
    # model
    ap.add_argument("--hidden", type=int, default=144)
    ap.add_argument("--intermediate", type=int, default=24)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--max-positions", type=int, default=2048)
    # optimisation
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument(
        "--balance-coef", type=float, default=0.01, help="per-layer load-balancing loss coefficient"
    )
    ap.add_argument("--z-coef", type=float, default=1e-4, help="per-layer router z-loss coefficient")
    ap.add_argument(
        "--prose-frac", type=float, default=0.45, help="share of training windows drawn from prose"
    )
    ap.add_argument("--time-limit", type=float, default=1e9, help="stop training after this many seconds")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=64, help="windows per domain for periodic evaluation")
    ap.add_argument(
        "--final-eval-windows", type=int, default=512, help="windows per domain for the final evaluation"
    )
    ap.add_argument("--sample-tokens", type=int, default=80)
    return ap.parse_args(argv)


def model_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> OlmoeConfig:
    """OLMoE-1B-7B's routing geometry (layers, experts, top-k, no top-k renormalisation) at a tiny width."""
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.balance_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def routing_losses(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers of the Switch load-balancing loss, sum over layers of the router z-loss).

    Per layer with logits [T, E]: ``E * sum_e f_e * P_e`` where f_e is the share of the T*K routed slots that went
    to expert e and P_e the mean router probability of e (1.0 when perfectly balanced), and ``mean(logsumexp^2)``.
    """
    balance = torch.zeros((), device=router_logits[0].device)
    z = torch.zeros((), device=router_logits[0].device)
    for logits in router_logits:
        logits = logits.float()  # [T, E]
        num_experts = logits.shape[-1]
        probs = logits.softmax(dim=-1)  # [T, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [T, K]
        counts = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(dim=0) / top_k  # [E], sums to 1
        balance = balance + num_experts * (counts * probs.mean(dim=0)).sum()
        z = z + torch.logsumexp(logits, dim=-1).pow(2).mean()
    return balance, z


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; logits [B, S, V] predict tokens [B, S] shifted by one."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())


def forward_losses(
    model: OlmoeForCausalLM, tokens: torch.Tensor, args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """Cross-entropy, balance and z losses of one batch (tokens [B, S]) under bf16 autocast where on CUDA."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda"):
        out = model(input_ids=tokens, output_router_logits=True, use_cache=False)
    ce = lm_loss(out.logits, tokens)
    balance, z = routing_losses(out.router_logits, args.top_k)
    total = ce + args.balance_coef * balance + args.z_coef * z
    return {
        "loss": total,
        "ce": ce,
        "balance": balance / len(out.router_logits),
        "z": z / len(out.router_logits),
    }


def train_step(
    model: OlmoeForCausalLM, opt: torch.optim.Optimizer, tokens: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """One optimiser step on tokens [B, S]; returns the (detached) losses and the gradient norm."""
    model.train()
    losses = forward_losses(model, tokens, args)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return {k: float(v.detach()) for k, v in losses.items()} | {"grad_norm": float(grad_norm)}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def load_tokens(data: Path) -> dict[str, np.ndarray]:
    """{"code-train": uint16 [N], ...} from ``DATA/tokens``."""
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted((data / "tokens").glob("*.npy"))}


def sample_batch(
    tokens: dict[str, np.ndarray], rng: np.random.Generator, args: argparse.Namespace
) -> torch.Tensor:
    """int64 [B, S]: random windows of the training split, prose with probability ``prose_frac``."""
    rows = []
    for _ in range(args.batch_size):
        arr = tokens["prose-train" if rng.random() < args.prose_frac else "code-train"]
        start = int(rng.integers(0, arr.size - args.seq_len))
        rows.append(np.asarray(arr[start : start + args.seq_len], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))


def eval_windows(arr: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """int64 [n', S]: up to ``n`` non-overlapping windows spread evenly over ``arr``."""
    total = arr.size // seq_len
    idx = np.unique(np.linspace(0, total - 1, num=min(n, total)).astype(int))
    return torch.from_numpy(
        np.stack([np.asarray(arr[i * seq_len : (i + 1) * seq_len], np.int64) for i in idx])
    )


@torch.no_grad()
def evaluate(model: OlmoeForCausalLM, windows: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Mean cross-entropy of windows [n, S] and per-layer usage statistics of the router's top-k choices."""
    model.eval()
    ce_sum, counts = 0.0, torch.zeros(args.layers, args.experts, device=args.device)
    for chunk in windows.split(args.batch_size):
        chunk = chunk.to(args.device)
        with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=chunk.device.type == "cuda"):
            out = model(input_ids=chunk, output_router_logits=True, use_cache=False)
        ce_sum += float(lm_loss(out.logits, chunk)) * chunk.shape[0]
        for layer, logits in enumerate(out.router_logits):  # logits [T, E]
            chosen = logits.float().topk(args.top_k, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(chosen, minlength=args.experts).float()
    share = counts / counts.sum(dim=1, keepdim=True)  # [L, E]
    entropy = -(share * share.clamp_min(1e-12).log2()).sum(dim=1) / math.log2(args.experts)
    return {
        "ce": ce_sum / windows.shape[0],
        "entropy_ratio": [round(float(x), 4) for x in entropy],
        "max_share_x_uniform": [round(float(x) * args.experts, 3) for x in share.max(dim=1).values],
    }


@torch.no_grad()
def samples(model: OlmoeForCausalLM, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, str]]:
    """Greedy and sampled (temperature 0.8, top-k 40) continuations of ``SAMPLE_PROMPTS``."""
    model.eval()
    results = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
        for mode, kw in (
            ("greedy", {"do_sample": False}),
            ("sampled", {"do_sample": True, "temperature": 0.8, "top_k": 40}),
        ):
            torch.manual_seed(args.seed)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
                out = model.generate(
                    ids, max_new_tokens=args.sample_tokens, pad_token_id=tokenizer.eos_token_id, **kw
                )
            results.append(
                {
                    "prompt": prompt,
                    "mode": mode,
                    "text": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False),
                }
            )
    return results


def build_model(config: OlmoeConfig, args: argparse.Namespace, log: Any) -> OlmoeForCausalLM:
    """The model on ``args.device`` with the first experts implementation of ``args.experts_impl``'s chain that runs
    a forward and backward pass (grouped_mm -> batched_mm -> eager)."""
    chain = {"grouped_mm": ["grouped_mm", "batched_mm", "eager"], "batched_mm": ["batched_mm", "eager"]}
    for impl in chain.get(args.experts_impl, [args.experts_impl]):
        torch.manual_seed(args.seed)
        model = OlmoeForCausalLM(config).to(args.device)
        try:
            model.set_experts_implementation(impl)
            probe = torch.randint(0, config.vocab_size, (2, 16), device=args.device)
            forward_losses(model, probe, args)["loss"].backward()
            model.zero_grad(set_to_none=True)
            args.experts_impl_used = impl
            return model
        except Exception as exc:  # any failure means: try the next implementation
            log(f"experts implementation {impl!r} failed: {type(exc).__name__}: {exc}")
    raise RuntimeError("no experts implementation ran")


def save(model: OlmoeForCausalLM, tokenizer_dir: Path, out: Path, max_shard: str = "12MB") -> int:
    """Save the bf16 checkpoint (safetensors shards of at most ``max_shard``, so each file fits the GPU tool's 16 MiB
    transfer limit) and copy the tokenizer files beside it; returns the bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=max_shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = tokenizer_dir / name
        if src.exists() and src.resolve() != (out / name).resolve():
            shutil.copy(src, out / name)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def strip_names(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without the (long) lists of held-out document names, for the log."""
    out = json.loads(json.dumps(recipe))
    for split in out.get("manifest.json", {}).get("splits", {}).values():
        split.pop("test_names", None)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log_file = open(args.log, "w") if args.log else None  # noqa: SIM115

    def log(msg: str) -> None:
        print(msg, flush=True)
        if log_file:
            log_file.write(msg + "\n")
            log_file.flush()

    data = Path(args.data)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
    }
    recipe = {
        p.name: json.loads(p.read_text())
        for p in (data / "manifest.json", data / "tokens" / "stats.json")
        if p.exists()
    }
    log(
        f"args {json.dumps(vars(args))}\nversions {json.dumps(versions)}\nrecipe {json.dumps(strip_names(recipe))}"
    )
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokens = load_tokens(data)
    config = model_config(args, len(tokenizer), tokenizer.eos_token_id)
    model = build_model(config, args, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {n_params / 1e6:.2f}M parameters, experts implementation {args.experts_impl_used}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=args.device.startswith("cuda"),
    )
    evals = {
        f"{d}-{s}": eval_windows(tokens[f"{d}-{s}"], args.eval_windows, args.seq_len)
        for d in ("code", "prose")
        for s in ("test", "train")
    }
    history: list[dict[str, Any]] = []
    t0 = time.time()
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        losses = train_step(model, opt, sample_batch(tokens, rng, args).to(args.device), args)
        elapsed = time.time() - t0
        if step % args.log_every == 0 or step == args.steps - 1:
            tps = (step + 1) * args.batch_size * args.seq_len / elapsed
            log(
                f"step {step} lr {lr_at(step, args):.2e} "
                + " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                + f" tok/s {tps:.0f} elapsed {elapsed:.1f}s"
            )
        if (step + 1) % args.eval_every == 0:
            ev = {k: round(evaluate(model, w, args)["ce"], 4) for k, w in evals.items()}
            history.append(
                {"step": step + 1, "elapsed_s": round(time.time() - t0, 1)} | losses | {"eval": ev}
            )
            log(f"eval step {step + 1} {json.dumps(ev)}")
        if elapsed > args.time_limit:
            log(f"time limit reached after step {step}")
            break
    train_s = time.time() - t0
    final = {
        f"{d}-{s}": evaluate(
            model, eval_windows(tokens[f"{d}-{s}"], args.final_eval_windows, args.seq_len), args
        )
        for d in ("code", "prose")
        for s in ("test", "train")
    }
    for k, v in final.items():
        log(
            f"final {k}: ce {v['ce']:.4f} (ppl {math.exp(v['ce']):.2f}) entropy_ratio min "
            f"{min(v['entropy_ratio']):.3f} max_share_x_uniform max {max(v['max_share_x_uniform']):.2f}"
        )
    gen = samples(model, tokenizer, args)
    for s in gen:
        log(f"sample [{s['mode']}] {s['prompt']!r} -> {s['text']!r}")
    size = save(model, Path(args.tokenizer), Path(args.out))
    log(f"saved {args.out}: {size / 1e6:.2f} MB; training wall time {train_s:.1f}s")
    result = {
        "command": "python training/train_demo.py " + " ".join(argv or []),
        "args": vars(args),
        "versions": versions,
        "recipe": recipe,
        "parameters": n_params,
        "steps_run": step + 1,
        "train_wall_s": round(train_s, 1),
        "tokens_seen": (step + 1) * args.batch_size * args.seq_len,
        "history": history,
        "final": final,
        "samples": gen,
        "checkpoint_bytes": size,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if log_file:
        log_file.close()
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
