"""Measure the simulator's time-model constants on a GPU for a Mixtral-8x7B-geometry MoE layer (random bf16
weights, all resident): the per-layer decode compute (attention projections + router + the experts a step
touches, SwiGLU) at batch 1 and 8, and the pinned host->device bandwidth for one expert-sized copy.

    python benchmarks/measure_layer_time.py --out benchmarks/results/layer-time-mixtral-h100.json

Not included: attention over the KV cache (short contexts make it small), norms, sampling.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.common import event_ms


def timed(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median seconds of ``fn`` over ``iters`` CUDA-event-timed runs."""
    return event_ms(fn, iters, warmup) / 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, i, n = args.hidden, args.intermediate, args.experts
    kv = h * args.kv_heads // args.heads
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02

    wq, wk, wv, wo, router = w(h, h), w(kv, h), w(kv, h), w(h, h), w(n, h)
    gate_up = [w(2 * i, h) for _ in range(n)]
    down = [w(h, i) for _ in range(n)]

    def routing(tokens: int, distinct: int) -> list[torch.Tensor]:
        """Rows of each of ``distinct`` experts when token t goes to experts 2t and 2t+1 (mod distinct)."""
        pairs = [{(2 * t) % distinct, (2 * t + 1) % distinct} for t in range(tokens)]
        return [
            torch.tensor([t for t in range(tokens) if e in pairs[t]], device=dev) for e in range(distinct)
        ]

    def layer(x: torch.Tensor, rows_of: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
        y = (q + torch.nn.functional.pad(k + v, (0, h - kv))) @ wo.T
        _ = y @ router.T
        out = torch.zeros_like(y)
        for e, rows in enumerate(rows_of):
            a, b = (y[rows] @ gate_up[e].T).chunk(2, dim=-1)
            out.index_add_(0, rows, (torch.nn.functional.silu(a) * b) @ down[e].T)
        return out

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "geometry": vars(args)}
    for tokens, distinct in ((1, 2), (8, 6), (8, 8)):
        x = w(tokens, h)
        rows_of = routing(tokens, distinct)
        res[f"layer_ms_T{tokens}_E{distinct}"] = timed(lambda x=x, r=rows_of: layer(x, r)) * 1e3
    expert_bytes = 3 * h * i * 2
    host = torch.empty(expert_bytes, dtype=torch.uint8).pin_memory()
    slot = torch.empty(expert_bytes, dtype=torch.uint8, device=dev)
    t = timed(lambda: slot.copy_(host, non_blocking=True), iters=20, warmup=3)
    res["expert_bytes"] = expert_bytes
    res["h2d_GBps_pinned"] = expert_bytes / t / 1e9
    res["expert_copy_ms"] = t * 1e3
    res["command"] = "python " + " ".join(sys.argv)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
