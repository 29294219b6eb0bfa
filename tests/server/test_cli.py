"""``moeflow serve`` for real: a subprocess on a free loopback port that warms up before it listens, a completion
over HTTP, a request beyond ``--max-model-len`` refused, SIGTERM ends it after the stream in flight has run to its
end; bad ``--max-model-len`` values are one error line."""

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
from tests.cli.helpers import one_error_line, run


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
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.max_model_len, args.warmup) == (None, True)
    args = build_parser().parse_args(["serve", "--model", "m", "--max-model-len", "512", "--no-warmup"])
    assert (args.max_model_len, args.warmup) == (512, False)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --max-model-len: must be at least 1, got 0"),
        ("long", "argument --max-model-len: expected an integer, got 'long'"),
        ("257", "--max-model-len 257 is beyond the model's context of 256 positions (max_position_embeddings in "
                "config.json): use at most 256, or leave it unset"),
    ],
)  # fmt: skip
def test_bad_max_model_len(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    code, out, err = run(["serve", "--model", str(checkpoints["olmoe"]), "--device", "cpu", "--max-model-len", value],
                         capsys)  # fmt: skip
    assert code == 2 and out == ""
    assert message in one_error_line(err)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_serve_subprocess(checkpoints: dict[str, Path]):
    port = free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "moeflow", "serve", "--model", str(checkpoints["olmoe"]), "--device", "cpu",
           "--port", str(port), "--api-key", "k", "--log-level", "warning", "--max-model-len", "100"]  # fmt: skip
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
        long = {"prompt": [5] * 98, "max_tokens": 3}
        r = httpx.post(f"{base}/v1/completions", json=long, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "limit of 100 (--max-model-len" in r.json()["error"]["message"]
        stream = {**body, "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=stream, headers=auth, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # in flight: the stream still runs to its end
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"serving olmoe on http://127.0.0.1:{port}/v1 (sequences up to 100 positions)" in out
        assert out.count("moeflow: warmed up in ") == 1
        # warmed up before it says it serves (and before uvicorn listens)
        assert out.index("moeflow: warmed up in ") < out.index("serving olmoe")
        assert out.rstrip().endswith("moeflow: server stopped")  # the engine was closed after the shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
