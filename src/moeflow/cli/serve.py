"""``moeflow serve``: load one model and answer OpenAI-compatible HTTP requests (see :mod:`moeflow.server`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from moeflow.cli.args import int_at_least
from moeflow.cli.run import add_engine_args, engine_from_args
from moeflow.errors import MoeflowError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from moeflow.server import create_app
        from moeflow.server.app import warm_up
    except ModuleNotFoundError as err:
        raise MoeflowError(
            f"moeflow serve needs {err.name}: install the server extra with pip install 'moeflow[serve]'"
        ) from None
    llm = engine_from_args(args)
    try:  # a bad setting, or a warm-up that fails, is one error line: nothing was served
        app = create_app(
            llm,
            model_name=args.served_model_name,
            api_key=args.api_key or os.environ.get("MOEFLOW_API_KEY") or None,
            max_queue=args.max_queue,
            max_batch=args.batch_size,
            prefill_chunk=args.prefill_chunk,
            max_model_len=args.max_model_len,
            warmup=args.warmup,
        )
        warm_up(app)  # before uvicorn listens: the first request finds the decode step compiled and captured
    except BaseException:
        llm.close()
        raise
    try:
        limit = app.state.engine.max_model_len
        upto = f" (sequences up to {limit} positions)" if limit else ""
        print(
            f"moeflow: serving {app.state.model_name} on http://{args.host}:{args.port}/v1{upto}",
            file=sys.stderr,
        )
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found: make that
        # one return, so that the policy below still saves what it learned and the exit status is 0
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        app.state.engine.stop()  # a no-op after uvicorn's shutdown; the thread the warm-up started otherwise
        llm.close()  # the policy saves what it learned
        print("moeflow: server stopped", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    add_engine_args(p)
    p.add_argument(
        "--max-batch", type=int_at_least(1), dest="batch_size", default=argparse.SUPPRESS,
        help="requests run together at most (same as --batch-size)",
    )  # fmt: skip
    p.add_argument(
        "--prefill-chunk", type=int_at_least(1), default=256,
        help="prompt tokens prefilled per step at most, so a long prompt does not stall the streams decoding",
    )  # fmt: skip
    p.add_argument(
        "--max-model-len", type=int_at_least(1), default=None,
        help="longest sequence served, prompt plus completion (at most the model's context; unset: 4096 or the context if shorter): "
        "the decode bucket is sized for it at startup, longer requests are answered 400",
    )  # fmt: skip
    p.add_argument(
        "--no-warmup", dest="warmup", action="store_false",
        help="skip the startup request that compiles and captures the decode step (the first request pays for it)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: loopback only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port to listen on")
    p.add_argument(
        "--max-queue", type=int_at_least(1), default=64,
        help="requests that may wait for the engine; more are answered 429 with Retry-After",
    )  # fmt: skip
    p.add_argument(
        "--api-key",
        help="answer 401 unless requests send 'Authorization: Bearer KEY' (unset: $MOEFLOW_API_KEY if set, else no key)",
    )  # fmt: skip
    p.add_argument("--served-model-name", help="the model's name in the API (unset: the directory's name)")
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (access lines at info)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)
