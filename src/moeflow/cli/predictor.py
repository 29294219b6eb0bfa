"""``moeflow predictor train|eval``: fit ExpertFlow's routing-path predictor on recorded traces and judge it
per layer against the baselines (previous token's experts, global popularity, MoE-Infinity's EAM match)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moeflow.cli.args import int_at_least, number
from moeflow.errors import MoeflowError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predictor", help="train or evaluate the ExpertFlow routing-path predictor")
    sub = p.add_subparsers(dest="predictor_command", required=True)

    t = sub.add_parser("train", help="train a predictor from routing traces")
    t.add_argument("--traces", nargs="+", required=True, help="trace files (.npz) of one model")
    t.add_argument(
        "--model", default=None, help="checkpoint directory (default output: MODEL/moeflow/predictor.pt)"
    )
    t.add_argument("--out", default=None, help="predictor file to write (.pt)")
    t.add_argument(
        "--epochs", type=int_at_least(1), default=150, help="most epochs (early stopping usually ends sooner)"
    )
    t.add_argument(
        "--patience", type=int_at_least(1), default=6, help="epochs without validation gain before stopping"
    )
    t.add_argument("--hidden", type=int_at_least(1), default=128, help="GRU width")
    t.add_argument("--emb-dim", type=int_at_least(1), default=64, help="token embedding width")
    t.add_argument(
        "--max-vocab", type=int_at_least(1), default=8192, help="token ids with their own embedding"
    )
    t.add_argument("--no-prev-routing", action="store_true", help="do not feed the previous token's routing")
    t.add_argument(
        "--val-frac",
        type=number(0, 1, lo_open=True),
        default=0.15,
        help="share of requests held out for validation",
    )
    t.add_argument("--device", default="cpu", help="torch device for training")
    t.add_argument("--seed", type=int, default=0, help="seed of the split and the initial weights")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("record", help="record router inputs per token and layer (for speculative gating)")
    r.add_argument("--model", required=True, help="checkpoint directory")
    r.add_argument("--prompts", nargs="+", required=True, help="prompt files (one per line, or .jsonl)")
    r.add_argument("--out", required=True, help="hidden-state file to write (.npz)")
    r.add_argument("--prefill", type=int_at_least(1), default=64, help="prompt tokens kept per prompt")
    r.add_argument("--decode", type=int_at_least(0), default=32, help="tokens generated per prompt")
    r.add_argument("--device", default="cpu", help="torch device")
    r.add_argument(
        "--teacher-forced",
        action="store_true",
        help="decode tokens: the prompt's own next tokens, not generated",
    )
    r.set_defaults(func=cmd_record)

    e = sub.add_parser("eval", help="per-layer recall/precision of a predictor and the baselines")
    e.add_argument("--predictor", default=None, help="predictor file (default: MODEL/moeflow/predictor.pt)")
    e.add_argument("--model", default=None, help="checkpoint directory")
    e.add_argument("--traces", nargs="+", default=None, help="trace files to evaluate on (held-out requests)")
    e.add_argument(
        "--hidden",
        default=None,
        help="recorded router inputs to evaluate on by look-ahead distance (held-out)",
    )
    e.add_argument(
        "--train-hidden",
        default=None,
        help="recorded router inputs the gate maps and hybrid weights are fitted on",
    )
    e.add_argument(
        "--grid-step", type=number(0, 1, lo_open=True), default=0.1, help="hybrid weight grid step"
    )
    e.add_argument(
        "--gate",
        choices=("logit", "residual"),
        default="logit",
        help="the hybrid's gate: ridge maps to the router logits (default) or the residual maps alone",
    )
    e.add_argument(
        "--dev",
        action="store_true",
        help="no held-out: fit on the even-numbered requests of --train-hidden, judge on the odd ones",
    )
    e.add_argument(
        "--train-traces", nargs="*", default=None, help="traces the EAM-match baseline learns from"
    )
    e.add_argument(
        "--top", type=int_at_least(1), nargs="*", default=None, help="predicted set sizes (default: k and 2k)"
    )
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=cmd_eval)


def _predictor_path(args: argparse.Namespace, flag: str) -> Path:
    from moeflow.routing.predictor import default_path

    given = getattr(args, flag)
    if given:
        return Path(given)
    if args.model:
        return default_path(args.model)
    raise MoeflowError(f"say where the predictor goes: --{flag} FILE or --model DIR")


def _traces(paths: list[str]) -> list:
    from moeflow.routing.trace import Trace

    return [Trace.load(p) for p in paths]


def cmd_train(args: argparse.Namespace) -> int:
    from moeflow.config import format_size
    from moeflow.routing.predictor import file_size, save_predictor
    from moeflow.routing.predictor_train import TrainConfig, train_predictor

    out = _predictor_path(args, "out")
    cfg = TrainConfig(
        emb_dim=args.emb_dim,
        hidden=args.hidden,
        max_vocab=args.max_vocab,
        use_prev_routing=not args.no_prev_routing,
        max_epochs=args.epochs,
        patience=args.patience,
        val_frac=args.val_frac,
        seed=args.seed,
        device=args.device,
    )
    net, vocab, info = train_predictor(_traces(args.traces), cfg)
    info["traces"] = [str(p) for p in args.traces]
    save_predictor(out, net, vocab, info)
    print(
        f"predictor: {info['params']:,} parameters ({format_size(file_size(out))} on disk), "
        f"{info['epochs']} epochs, validation recall@k {info['val_recall']:.3f} "
        f"on {info['val_requests']} held-out requests -> {out}"
    )
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from moeflow.cli.prompts import read_prompts
    from moeflow.routing.hidden import record_hidden

    prompts = [p for path in args.prompts for p in read_prompts(path)]
    rec = record_hidden(
        args.model, prompts, args.prefill, args.decode, args.device, generate=not args.teacher_forced
    )
    rec.save(args.out)
    t = rec.trace
    print(
        f"recorded {t.num_tokens} tokens of {len(t.requests())} prompts ({int(t.decode.sum())} generated) -> {args.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.hidden or args.train_hidden:
        return _eval_lookahead(args)
    if not args.traces:
        raise MoeflowError("say what to evaluate on: --traces FILE... (or --hidden and --train-hidden)")
    from moeflow.routing import predictor_eval as pe
    from moeflow.routing import sequences as rs
    from moeflow.routing.predictor import load_net, load_predictor, time_per_token

    path = _predictor_path(args, "predictor")
    net, vocab, info = load_net(path)
    seqs, (nl, ne, k) = rs.load_sequences(_traces(args.traces))
    if (nl, ne, k) != (net.cfg.num_layers, net.cfg.num_experts, net.cfg.top_k):
        raise MoeflowError(
            f"{path} predicts {net.cfg.num_layers}×{net.cfg.num_experts} routing, the traces are {nl}×{ne}"
        )
    train = rs.load_sequences(_traces(args.train_traces))[0] if args.train_traces else []
    pop = np.asarray(info["popularity"]) if "popularity" in info else pe.popularity(train or seqs, ne)
    scorers, notes = pe.baselines(train, pop)
    results = pe.compare({"predictor": pe.net_scorer(net, vocab), **scorers}, seqs, k, args.top)
    longest = max(seqs, key=len).tokens[:256]
    speed = time_per_token(load_predictor(path), longest)
    report = {
        "predictor": str(path),
        "traces": args.traces,
        "notes": notes,
        "cpu_time": speed,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    _print_table(results, k)
    print(
        f"predictor CPU time (NumPy runtime): {speed['decode_us_per_token']:.0f} µs/token decoding, "
        f"{speed['prefill_us_per_token']:.0f} µs/token in prefill"
    )
    for note in notes:
        print("note:", note)
    return 0


def _eval_lookahead(args: argparse.Namespace) -> int:
    from moeflow.routing import predictor_eval as pe
    from moeflow.routing.hidden import HiddenRecord
    from moeflow.routing.lookahead_eval import evaluate_lookahead
    from moeflow.routing.predictor import load_net

    if not args.train_hidden or not (args.hidden or args.dev):
        raise MoeflowError(
            "look-ahead evaluation needs --train-hidden (training split) and --hidden (held-out) or --dev"
        )
    path = _predictor_path(args, "predictor")
    net, vocab, _ = load_net(path)
    train = HiddenRecord.load(args.train_hidden)
    if args.dev:
        order = {r: i for i, r in enumerate(train.trace.requests())}
        odd = np.asarray([order[int(r)] % 2 == 1 for r in train.trace.request])
        held, train = train.select(odd), train.select(~odd)
    else:
        held = HiddenRecord.load(args.hidden)
    t = held.trace
    if (t.num_layers, t.num_experts, t.top_k) != (net.cfg.num_layers, net.cfg.num_experts, net.cfg.top_k):
        raise MoeflowError(
            f"{path} predicts {net.cfg.num_layers}×{net.cfg.num_experts} routing, {args.hidden} is {t.num_layers}×{t.num_experts}"
        )
    results, weights, info = evaluate_lookahead(
        held, train, pe.net_scorer(net, vocab), args.grid_step, gate=args.gate
    )
    report = {"predictor": str(path), "hidden": args.hidden, "train_hidden": args.train_hidden, "dev": args.dev,
              "k": t.top_k, "results": results, "gate": info,
              "hybrid_weights": {"components": ["gate", "path", "last_token"], **weights.to_dict()}}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    keys = list(results["hybrid"])
    print(
        f"per-token recall of the true top-{t.top_k} among the predicted top-{t.top_k}, by look-ahead distance"
    )
    print(f"{'method':<14}" + "".join(f"{k_:>14}" for k_ in keys))
    for name, by in results.items():
        print(
            f"{name:<14}" + "".join(f"{by[k_]['recall']:>14.3f}" if by[k_] else f"{'-':>14}" for k_ in keys)
        )
    return 0


def _print_table(results: dict, k: int) -> None:
    names = list(results)
    key = f"top{k}"
    print(f"per-token recall of the true top-{k} among the predicted top-{k} (= precision at this size)")
    print(f"{'layer':<24}" + "".join(f"{n:>13}" for n in names))
    layers = len(results[names[0]][key]["overall"]["recall_per_layer"])
    for layer in range(layers):
        row = [results[n][key]["overall"]["recall_per_layer"][layer] for n in names]
        print(f"{layer:<24}" + "".join(f"{v:>13.3f}" for v in row))
    for size in results[names[0]]:
        for part in ("overall", "prefill", "decode"):
            if part not in results[names[0]][size]:
                continue
            m = results[names[0]][size]["m"]
            for metric in ("recall", "precision"):
                vals = "".join(f"{results[n][size][part][metric]:>13.3f}" for n in names)
                print(f"{f'{part} top{m} {metric}':<24}{vals}")
