"""A bounded load test of ``moeflow serve``: N concurrent streaming clients on loopback for a fixed time.

Starts the server as a subprocess on a free 127.0.0.1 port, runs ``--clients`` clients (each sends streaming
completions one after another, with include_usage) for ``--duration`` seconds, stops issuing, waits for the
requests in flight, then sends SIGTERM. Reports requests served, errors, p50/p99 time to first token and time per
output token (client side), and the server's resident memory before the load, during it (sampled) and at the end.
Everything stops by itself (a hard deadline of --startup-s + duration + 120 s). Writes one JSON to ``--out``.

    python benchmarks/serve_load.py --model models/demo --clients 64 --duration 120 \\
        --out benchmarks/results/serve-load-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "def fibonacci(n):", "The history of the city", "import numpy as np\n", "Once upon a time",
    "The capital of France is", "class Stack:\n    def __init__(self):", "SELECT name FROM", "Dear Sir or Madam,",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def standin_view(model: Path, root: Path) -> Path:
    """A view of a checkpoint without a tokenizer (a synthesised one): links to its files, plus a stand-in tokenizer
    with one word per token id ("t0", "t1", ...), so that the server streams text for every token (TTFT and time per
    token become measurable). The checkpoint itself is left as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    view = root / model.name
    view.mkdir(parents=True)
    for f in model.iterdir():
        (view / f.name).symlink_to(f.resolve())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(view / "tokenizer.json"))
    (view / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return view


def prompt_body(prompt: str, prompts: str) -> str | list[int]:
    """``prompts``: "text" (the model's tokenizer), "ids" (none: token ids), "words" (the stand-in's words for the
    same ids)."""
    ids = [ord(c) % 256 + 3 for c in prompt]
    return prompt if prompts == "text" else ids if prompts == "ids" else " ".join(f"t{i}" for i in ids)


async def one_request(
    client: httpx.AsyncClient, base: str, rng: random.Random, max_tokens: int, prompts: str = "text"
) -> dict:
    prompt = rng.choice(PROMPTS)
    body = {"prompt": prompt_body(prompt, prompts), "max_tokens": rng.randint(max_tokens // 2, max_tokens),
            "temperature": rng.choice([0.0, 0.8]), "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    tokens, error = 0, None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"]:
                now = time.perf_counter()
                first = first or now
                last = now
    if error or first is None:
        return {"error": error or "no tokens"}
    if (
        prompts == "ids"
    ):  # no text to stream: the only chunk with a choice is the last (the request's latency)
        return {"ttft": None, "tpot": None, "latency": last - t0, "tokens": tokens}
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - t0, "tpot": tpot, "latency": last - t0, "tokens": tokens}


async def load(
    base: str, clients: int, duration: float, max_tokens: int, pid: int, prompts: str = "text"
) -> dict:
    stop_at = time.perf_counter() + duration
    results: list[dict] = []
    rss: list[tuple[float, int]] = []

    async def client_loop(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            while time.perf_counter() < stop_at:
                try:
                    results.append(await one_request(client, base, rng, max_tokens, prompts))
                except Exception as err:  # a transport error counts as an error, the client goes on
                    results.append({"error": f"{type(err).__name__}: {err}"})

    async def sample_rss() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            rss.append((round(time.perf_counter() - t0, 1), rss_bytes(pid)))
            await asyncio.sleep(5)

    t0 = time.perf_counter()
    await asyncio.gather(sample_rss(), *(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    latency = [r["latency"] for r in ok]
    generated = sum(r["tokens"] for r in ok)
    return {
        "requests_served": len(ok), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 1),
        "generated_tokens": generated, "tokens_per_s": round(generated / wall, 1),
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "max": max(ttft, default=None)},
        "tpot_s": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
        "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
        "prompts": prompts,
        "ttft_note": "" if prompts != "ids" else "not measured: the model has no tokenizer, so the server streams no text "
        "before a request's last chunk (latency_s is the whole request's)",
        "rss_samples": rss,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument(
        "--device", default="cpu", help="the server's device (cuda: graph decode, compiled at startup)"
    )
    ap.add_argument(
        "--startup-s",
        type=float,
        default=120.0,
        help="seconds the server may take to warm up (compile, capture)",
    )
    ap.add_argument(
        "--note", default="", help="free text stored in the JSON (e.g. what else shared the machine)"
    )
    ap.add_argument(
        "--standin-tokenizer", action="store_true",
        help="a model without a tokenizer is served from a view of it with a stand-in tokenizer (one word per token "
        "id), so that text streams and TTFT / time per token can be measured",
    )  # fmt: skip
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    port, root = free_port(), Path(__file__).resolve().parents[1]
    has_tokenizer = any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    prompts = "text" if has_tokenizer else "words" if args.standin_tokenizer else "ids"
    scratch = tempfile.TemporaryDirectory()
    if prompts == "words":
        args.model = str(standin_view(Path(args.model), Path(scratch.name)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "moeflow", "serve", "--model", args.model, "--device", args.device, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.clients), "--prefill-chunk",
           str(args.prefill_chunk), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    hard = threading_deadline(server, args.startup_s + args.duration + 120)
    try:
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rss_start = rss_bytes(server.pid)
        metrics_start = httpx.get(f"{base}/metrics", timeout=10).text
        out = asyncio.run(load(base, args.clients, args.duration, args.max_tokens, server.pid, prompts))
        rss_end = rss_bytes(server.pid)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        hard.cancel()
        server.send_signal(signal.SIGTERM)
        try:
            log = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            log = server.communicate()[0]
        scratch.cleanup()
    import torch
    import transformers

    commit = (
        os.environ.get("MOEFLOW_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root
        ).stdout.strip()
    )
    gpu = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None
    )
    result = {
        "command": " ".join(sys.argv), "commit": commit, "server_command": " ".join(cmd[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "device": gpu or "cpu", "note": args.note,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "httpx": httpx.__version__},
        "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, **out, "server_rss_start_bytes": rss_start, "server_rss_end_bytes": rss_end,
        "server_exit_code": server.returncode, "server_log_tail": log[-500:],
        "server_requests_by_status": [ln for ln in metrics.splitlines() if ln.startswith("moeflow_requests_total")],
        "engine_phases": engine_phases(metrics_start, metrics),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("requests_served", "errors", "ttft_s", "tpot_s", "latency_s", "engine_phases")
            }
        )
    )
    print(f"server RSS {rss_start / 2**20:.0f} MiB -> {rss_end / 2**20:.0f} MiB; wrote {args.out}")
    return 0 if out["errors"] == 0 else 1


def engine_phases(before: str, after: str) -> dict:
    """The server engine's time per step phase during the load (two /metrics scrapes): seconds, count, mean ms,
    and the prompt tokens prefilled."""

    def value(text: str, name: str, phase: str | None = None) -> float:
        label = "" if phase is None else rf'\{{phase="{phase}"\}}'
        found = re.search(rf"^{name}{label} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    out: dict = {}
    for phase in ("admit", "decode", "prefill"):
        sec, n = (value(after, f"moeflow_engine_phase{s}_total", phase) - value(before, f"moeflow_engine_phase{s}_total", phase)
                  for s in ("_seconds", ""))  # fmt: skip
        out[phase] = {"seconds": sec, "count": int(n), "mean_ms": 1e3 * sec / n if n else None}
    name = "moeflow_engine_prefill_tokens_total"
    out["prefill_tokens"] = int(value(after, name) - value(before, name))
    return out


def threading_deadline(server: subprocess.Popen, seconds: float):
    """Kill the server if the whole run takes longer than ``seconds`` (the benchmark always stops by itself)."""
    import threading

    timer = threading.Timer(seconds, server.kill)
    timer.daemon = True
    timer.start()
    return timer


if __name__ == "__main__":
    sys.exit(main())
