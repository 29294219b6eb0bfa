"""llama.cpp as a benchmark peer: every tensor on the GPU (``-ngl 99``) and experts kept on the CPU for the first N
layers (``--n-cpu-moe N``), batch 1 and 8, timed with llama.cpp's own tools, rows appended to the peers JSON.

Batch B decoding is ``llama-batched-bench -npp P -ntg G -npl B``: B sequences with their own P-token prompts
(prefilled together), then G steps each decoding one token for every sequence. Its t_pp is the time to the first
token of all B, its S_TG the decode tokens per second over all sequences. ``llama-bench -p P -n G -ncmoe 0`` (one
sequence) runs last as a cross-check and lands in ``llama_bench``. One process per configuration, each under a timeout,
none started past ``--deadline``; a second call runs only what the file does not hold yet.

    python3 benchmarks/peers/llama_runs.py --bin .work/peers/llama-cuda/bin --source .work/peers/llama.cpp --gguf /dev/shm/olmoe.gguf \
        --model /dev/shm/olmoe --out /tmp/peers.json --n-cpu-moe 0,12,14 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from benchmarks.peers.record import GpuMemorySampler, add_run, add_skip, load, save, set_version
from benchmarks.peers.sizes import checkpoint_sizes


def jsonl_rows(text: str) -> list[dict]:
    """The JSON objects among ``text``'s lines (the tools mix them with log lines)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_tool(cmd: list[str], timeout: float, log: Path) -> tuple[int, str, int]:
    """Run ``cmd`` under ``timeout`` seconds; (return code, stdout, peak GPU bytes it added); output kept in
    ``log``. A timeout returns code 124."""
    with GpuMemorySampler() as mem, log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            code, stdout, stderr = out.returncode, out.stdout, out.stderr
        except subprocess.TimeoutExpired as e:
            code = 124
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        f.write(stdout + stderr[-4000:] + f"\nrc {code}\n")
    return code, stdout + "\n" + stderr, mem.delta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="folder holding llama-batched-bench and llama-bench")
    ap.add_argument(
        "--source", required=True, help="the unpacked llama.cpp tree (its MOEFLOW_SOURCE names it)"
    )
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", required=True, help="the HF checkpoint the GGUF came from (for byte counts)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--geometry", default="olmoe")
    ap.add_argument(
        "--n-cpu-moe", default="0,12,14", help="layers whose experts stay on the CPU (0: all on GPU)"
    )
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one configuration may take")
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds after which nothing new starts")
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--bench-n-cpu-moe", default="0", help="llama-bench cross-check: its --n-cpu-moe list")
    args = ap.parse_args()
    sizes = checkpoint_sizes(Path(args.model))
    threads = str(os.cpu_count() or 8)
    log = args.out.with_name("llama-runs.log")
    bindir = Path(args.bin)
    info = Path(args.source) / "MOEFLOW_SOURCE"
    set_version(args.out, "llama.cpp", info.read_text().strip() if info.exists() else "unknown")
    batches = [int(b) for b in args.batches.split(",")]
    result = load(args.out)  # a second call resumes: what ran is kept, what was skipped is tried again
    done = {(r["n_cpu_moe"], r["batch"]) for r in result["runs"] if r["system"].startswith("llama.cpp")}
    result["skipped"] = [s for s in result["skipped"] if not s["system"].startswith("llama")]
    save(args.out, result)

    def left() -> float:
        return args.deadline - time.time() if args.deadline else float("inf")

    for n_cpu in [int(n) for n in args.n_cpu_moe.split(",")]:
        on_gpu = (sizes.layers - min(n_cpu, sizes.layers)) / sizes.layers
        system = "llama.cpp-gpu" if n_cpu == 0 else "llama.cpp-n-cpu-moe"
        for batch in batches:
            if (n_cpu, batch) in done:
                continue
            if left() < 20:
                add_skip(args.out, system, f"n_cpu_moe={n_cpu} batch={batch}: past the deadline")
                continue
            ctx = batch * -(-(args.prompt + args.gen) // 256) * 256  # a multiple of batch: no rounding
            load_mode = (
                ["-lm", "none"] if n_cpu else []
            )  # llama.cpp's advice when tensors are kept on the CPU
            cmd = [
                str(bindir / "llama-batched-bench"), "-m", args.gguf, "-ngl", "99", "--n-cpu-moe", str(n_cpu),
                "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(args.prompt), "-ntg", str(args.gen),
                "-npl", str(batch), "-t", threads, "--output-format", "jsonl", *load_mode,
            ]  # fmt: skip
            code, text, peak = run_tool(cmd, min(args.timeout, max(left(), 20)), log)
            rows = [r for r in jsonl_rows(text) if "speed_tg" in r]
            if code != 0 or not rows:
                add_skip(
                    args.out, system, f"n_cpu_moe={n_cpu} batch={batch}: rc {code}, {text.strip()[-300:]}"
                )
                continue
            r = rows[-1]
            add_run(
                args.out, system=system, geometry=args.geometry, cache_fraction=on_gpu,
                gpu_budget=sizes.dense_bytes + int(on_gpu * sizes.expert_bytes_total), batch=batch,
                prompt_tokens=args.prompt, ttft_ms=1e3 * r["t_pp"], ms_per_token=1e3 / r["speed_tg"],
                tokens_per_s=r["speed_tg"], step_ms=1e3 * r["t_tg"] / args.gen, generated_tokens=args.gen,
                peak_gpu_bytes=peak, n_cpu_moe=n_cpu,
                notes=f"llama-batched-bench bf16 GGUF, -ngl 99 --n-cpu-moe {n_cpu} (experts of the first {n_cpu} "
                f"of {sizes.layers} layers on the CPU, {threads} threads{', -lm none' if n_cpu else ''}), "
                "the checkpoint's own routing; "
                "peak_gpu_bytes from nvidia-smi",
            )  # fmt: skip
    if args.no_llama_bench or load(args.out)["llama_bench"] or left() < 60:
        return
    cmd = [
        str(bindir / "llama-bench"), "-m", args.gguf, "-p", str(args.prompt), "-n", str(args.gen), "-ngl", "99",
        "-ncmoe", args.bench_n_cpu_moe, "-r", "2", "-t", threads, "-o", "jsonl",
    ]  # fmt: skip
    code, text, _ = run_tool(cmd, min(args.timeout * 1.5, max(left(), 20)), log)
    result = load(args.out)
    result["llama_bench"] += [
        {k: r.get(k) for k in ("n_prompt", "n_gen", "n_cpu_moe", "n_gpu_layers", "avg_ns", "avg_ts", "stddev_ts")}
        for r in jsonl_rows(text)
    ]  # fmt: skip
    if code != 0:
        result["skipped"].append({"system": "llama-bench", "reason": f"rc {code}: {text.strip()[-300:]}"})
    save(args.out, result)


if __name__ == "__main__":
    main()
