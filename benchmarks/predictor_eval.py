"""Train and evaluate ExpertFlow's routing-path predictor: in-domain (held-out requests of the domain it was
trained on) and cross-domain (train on one domain, test on another), next to the baselines (previous token's
experts, global popularity, MoE-Infinity's EAM match), per layer; writes ``benchmarks/results/predictor-*.json``.

Demo-model traces (one or more files per domain; a domain without --test is split by request, 80/20):

    python benchmarks/predictor_eval.py --name demo \\
        --train code=traces/demo-train-code.npz --train prose=traces/demo-train-prose.npz \\
        --test code=traces/demo-heldout-code.npz --test prose=traces/demo-heldout-prose.npz

Synthetic traces with structure (``synthetic_routing.py``), until real ones exist:

    python benchmarks/predictor_eval.py --synthetic --name synthetic

``--variant NAME:key=value,...`` adds predictor configurations (TrainConfig fields) to compare; the first is
the one whose cross-domain results and CPU time are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moeflow.routing import predictor_eval as pe
from moeflow.routing import predictor_train as pt
from moeflow.routing import sequences as rs
from moeflow.routing.predictor import RoutingPredictor, time_per_token
from moeflow.routing.trace import Trace

RESULTS = Path(__file__).parent / "results"
SPECIALIZATION = 0.5
"""Synthetic traces: per-domain router bias (0.5 keeps usage entropy >= 0.9 of uniform per domain)."""


def parse_domains(items: list[str], prompts: dict[str, set[str]]) -> dict[str, list[Trace]]:
    """DOMAIN=TRACE[,TRACE] items; with a prompt file for the domain, only requests whose prompt is in it."""
    out: dict[str, list[Trace]] = {}
    for item in items:
        name, _, paths = item.partition("=")
        for p in paths.split(","):
            trace = Trace.load(p)
            if name in prompts:
                trace = trace.of_requests([r for r, text in trace.prompts.items() if text in prompts[name]])
            out.setdefault(name, []).append(trace)
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    fields = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        default = getattr(pt.TrainConfig(), k)
        fields[k] = (v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(v)
    return name, fields


def synthetic_domains(scale: float) -> tuple[dict[str, list[Trace]], dict[str, list[Trace]]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_routing import SyntheticRouter

    router = SyntheticRouter(num_layers=16, num_experts=64, top_k=8, specialization=SPECIALIZATION)
    n = max(4, int(48 * scale))
    train = {d: [router.trace(d, n * 4, 48, 64, seed=1 + i)] for i, d in enumerate(("code", "prose"))}
    test = {d: [router.trace(d, n, 48, 64, seed=11 + i)] for i, d in enumerate(("code", "prose"))}
    return train, test


def split_domains(train: dict, test: dict, seed: int) -> tuple[dict, dict]:
    """Sequences per domain; a domain without test traces gives 20% of its requests as the test split."""
    tr, te = {}, {}
    for name, traces in train.items():
        seqs, _ = rs.load_sequences(traces)
        if name in test:
            tr[name], te[name] = seqs, rs.load_sequences(test[name])[0]
        else:
            tr[name], te[name] = rs.split_requests(seqs, 0.2, seed)
    return tr, te


def fit(seqs: list[rs.RequestSeq], shape: tuple[int, int, int], cfg: pt.TrainConfig) -> tuple:
    t0 = time.perf_counter()
    net, vocab, info = pt.train_on_sequences(seqs, shape, cfg, progress=False)
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    return net, vocab, info


def evaluate(net, vocab, info, train_seqs, test_seqs, k) -> dict:
    pop = np.asarray(info["popularity"])
    scorers, notes = pe.baselines(train_seqs, pop)
    res = pe.compare({"predictor": pe.net_scorer(net, vocab), **scorers}, test_seqs, k)
    return {"notes": notes, "test_requests": len(test_seqs), "methods": res}


def summary_line(label: str, res: dict, k: int) -> str:
    parts = [f"{n}={m[f'top{k}']['overall']['recall']:.3f}" for n, m in res["methods"].items()]
    dec = res["methods"]["predictor"][f"top{k}"].get("decode", {}).get("recall")
    return f"{label:<28} recall@{k}: " + " ".join(parts) + (f" (predictor decode {dec:.3f})" if dec else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="append", default=[], help="DOMAIN=TRACE[,TRACE] (repeatable)")
    ap.add_argument("--test", action="append", default=[], help="DOMAIN=TRACE[,TRACE] held-out traces")
    ap.add_argument(
        "--domain-prompts", action="append", default=[], help="DOMAIN=PROMPTFILE: keep its requests"
    )
    ap.add_argument("--synthetic", action="store_true", help="use synthetic_routing.py traces")
    ap.add_argument("--device", default="cpu", help="torch device for training")
    ap.add_argument("--scale", type=float, default=1.0, help="synthetic data size factor")
    ap.add_argument("--variant", action="append", default=[], help="NAME:field=value,... (TrainConfig)")
    ap.add_argument("--name", default="demo", help="results go to benchmarks/results/predictor-NAME.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        train, test = synthetic_domains(args.scale)
    else:
        from moeflow.cli.prompts import read_prompts

        prompts = {n: set(read_prompts(f)) for n, f in (x.split("=", 1) for x in args.domain_prompts)}
        train, test = parse_domains(args.train, {}), parse_domains(args.test, prompts)
    if not train:
        ap.error("give --train DOMAIN=TRACE (or --synthetic)")
    first = next(iter(train.values()))[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    k = shape[2]
    tr, te = split_domains(train, test, args.seed)
    variants = [parse_variant(v) for v in args.variant] or [("gru", {})]
    out: dict = {
        "command": "python " + " ".join(sys.argv),
        "shape": dict(zip(("L", "E", "K"), shape)),
        "runs": {},
    }
    for vname, fields in variants:
        cfg = pt.TrainConfig(seed=args.seed, device=args.device, **fields)
        everything = [s for seqs in tr.values() for s in seqs]
        net, vocab, info = fit(everything, shape, cfg)
        run = {
            "config": fields,
            "train": {x: v for x, v in info.items() if x not in ("popularity",)},
            "eval": {},
        }
        for dom, seqs in te.items():
            run["eval"][f"all->{dom}"] = evaluate(net, vocab, info, everything, seqs, k)
            print(summary_line(f"{vname} all->{dom}", run["eval"][f"all->{dom}"], k))
        if vname == variants[0][0] and len(tr) > 1:
            for src, seqs in tr.items():
                net_d, vocab_d, info_d = fit(seqs, shape, cfg)
                for dom, tseqs in te.items():
                    label = f"{src}->{dom}" + (" (in-domain)" if src == dom else " (cross-domain)")
                    run["eval"][label] = evaluate(net_d, vocab_d, info_d, seqs, tseqs, k)
                    print(summary_line(f"{vname} {label}", run["eval"][label], k))
        if vname == variants[0][0]:
            rt = RoutingPredictor(
                net.cfg, vocab, {n: p.detach().cpu().numpy() for n, p in net.state_dict().items()}
            )
            longest = max((s for seqs in te.values() for s in seqs), key=len).tokens[:256]
            run["cpu_time"] = {**time_per_token(rt, longest), "threads": torch.get_num_threads()}
            print("CPU time (NumPy runtime):", run["cpu_time"])
        out["runs"][vname] = run
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"predictor-{args.name}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
