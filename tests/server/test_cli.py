"""``moeflow serve`` for real: a subprocess on a free loopback port, a completion over HTTP, SIGTERM ends it after
the stream in flight has run to its end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from moeflow.cli import build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parser_knows_serve():
    args = build_parser().parse_args(["serve", "--model", "m", "--max-batch", "3", "--max-queue", "5"])
    assert (args.batch_size, args.max_queue, args.host, args.port, args.api_key) == (
        3,
        5,
        "127.0.0.1",
        8000,
        None,
    )
    assert build_parser().parse_args(["serve", "--model", "m"]).batch_size == 8


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_serve_subprocess(checkpoints: dict[str, Path]):
    port = free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "moeflow", "serve", "--model", str(checkpoints["olmoe"]), "--device", "cpu",
           "--port", str(port), "--api-key", "k", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 60 s"
            time.sleep(0.2)
        body = {"prompt": "def fib(n):", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
        r = httpx.post(f"{base}/v1/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        stream = {**body, "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=stream, headers=auth, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # in flight: the stream still runs to its end
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"serving olmoe on http://127.0.0.1:{port}/v1" in out
        assert out.rstrip().endswith("moeflow: server stopped")  # the engine was closed after the shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
