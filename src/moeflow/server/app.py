"""The FastAPI app: OpenAI-compatible routes over an :class:`~moeflow.server.loop.EngineLoop`, built by
``create_app`` (no module-level state: each app owns its engine thread, queue and metrics registry).

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON, or server-sent events with
``stream: true`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Every
error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(the engine's :class:`~moeflow.errors.RequestError`, failed validation, malformed JSON), 401 for a missing or
wrong API key, 404 for an unknown model, 429 with ``Retry-After`` when the queue is full. A request longer than
the server's ``max_model_len`` is a 400 with code ``context_length_exceeded``. The errors and their handlers live
in ``server.api_errors``.

Startup (the lifespan, before uvicorn listens, so ``/health`` answers only once it is done): the engine thread
starts and, unless ``warmup=False``, runs one tiny request (``warm_up``), printing one line with its time.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeflow.errors import BudgetError
from moeflow.server import protocol as P
from moeflow.server.api_errors import APIError, add_error_handlers, api_error
from moeflow.server.loop import EngineLoop, Finished, Job, QueueFull, Sink, Stopped
from moeflow.server.metrics import ServerMetrics

DISCONNECT_POLL_S = 0.25
"""How often a handler waiting for a non-streamed answer checks that its client is still there."""
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class StatusCounter:
    """ASGI middleware counting answered requests by route and status (streams count when their headers go)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def warm_up(app: FastAPI) -> None:
    """Start ``app``'s engine thread and run its warm-up request, once, printing one line (blocking: the CLI calls
    it before uvicorn starts, so a failure is its one-line error; the lifespan calls it otherwise). Nothing when
    the app was made with ``warmup=False``; on a failure the engine thread is stopped and the error raised."""
    engine: EngineLoop = app.state.engine
    if not app.state.warmup or engine.warmups:
        return
    engine.start()
    try:
        seconds = engine.warm_up()
    except BudgetError as err:  # the bucket holds max_batch rows of max_model_len positions from the start
        engine.stop()
        raise BudgetError(
            f"{err}; or serve shorter sequences (--max-model-len, now {engine.max_model_len})"
        ) from None
    except BaseException:
        engine.stop()
        raise
    print(f"moeflow: warmed up in {seconds:.2f} s ({engine.decode_shape})", file=sys.stderr, flush=True)


def create_app(
    llm: Any, *, model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
    max_batch: int | None = None, prefill_chunk: int = 256, max_model_len: int | None = None,
    warmup: bool = True,
) -> FastAPI:  # fmt: skip
    """An app serving ``llm`` (a :class:`moeflow.LLM`) under ``model_name`` (default: its directory's name),
    at most ``max_batch`` sequences at once (default: ``llm.batch_size``), prefilling at most ``prefill_chunk``
    prompt tokens per step, sequences of at most ``max_model_len`` positions (default: the model's context; the
    decode bucket is sized for it, so it never grows while serving). The engine thread starts with the app's
    lifespan, which first runs a warm-up request (``warmup=False``: none), and stops with it; closing ``llm``
    is the caller's job."""
    name = model_name or Path(llm.model_dir).name
    engine = EngineLoop(llm, max_queue, max_batch or llm.batch_size, prefill_chunk, max_model_len)
    metrics = ServerMetrics(llm, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        await asyncio.to_thread(warm_up, app)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="moeflow", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, name
    app.state.warmup = warmup
    app.add_middleware(StatusCounter, metrics=metrics)

    add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                           "invalid_api_key")  # fmt: skip

    def check_model(req: P._Request) -> None:
        if req.model is not None and req.model != name:
            raise APIError(404, f"model {req.model!r} does not exist: this server serves {name!r}",
                           "not_found_error", "model_not_found")  # fmt: skip

    async def first_event(job: Job, request: Request) -> Any:
        """Queue ``job`` and wait for its first event (raising its error as an ``APIError``); a client that goes
        away meanwhile ends the job."""
        try:
            engine.submit(job)
        except (QueueFull, Stopped) as err:
            raise api_error(err) from None
        get = asyncio.ensure_future(job.sink.get())
        while not (await asyncio.wait({get}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                get.cancel()
                raise APIError(400, "the client disconnected", code="client_disconnected")
        first = get.result()
        if isinstance(first, BaseException):
            raise api_error(first)
        return first

    async def answer(job: Job, request: Request, body: Any, streamer: Any) -> Any:
        try:
            first = await first_event(job, request)
        except BaseException:
            engine.cancel(job)
            raise
        if job.stream:
            return StreamingResponse(streamer(job, first), media_type="text/event-stream")
        assert isinstance(first, Finished)
        out = first.output
        metrics.finished(first.prompt_tokens, out, out.stats.ttft_s)
        return body(out.text, out.finish_reason, P.usage(first.prompt_tokens, len(out.token_ids)))

    async def events(job: Job, first: Any) -> AsyncIterator[tuple[str, Any]]:
        """(``"text"``, str) per new piece of text, then (``"end"``, Finished) or (``"error"``, APIError)."""
        item: Any = first
        try:
            while True:
                if isinstance(item, BaseException):
                    yield "error", api_error(item)
                    return
                if isinstance(item, Finished):
                    metrics.finished(item.prompt_tokens, item.output, item.output.stats.ttft_s)
                    yield "end", item
                    return
                if item.text:
                    yield "text", item.text
                item = await job.sink.get()
        finally:
            engine.cancel(job)  # a no-op when finished; ends the sequence when the client went away

    router = APIRouter(dependencies=[Depends(check_key)])

    @router.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req)
        rid, created = P.new_id("cmpl"), int(time.time())

        def body(text: str, reason: str | None, use: dict | None) -> dict:
            return P.completion_body(rid, name, text, reason, use, created)

        async def streamer(job: Job, first: Any) -> AsyncIterator[str]:
            async for kind, value in events(job, first):
                if kind == "text":
                    yield _sse(body(value, None, None))
                elif kind == "end":
                    yield _sse(body("", value.output.finish_reason, None))
                    if req.include_usage:
                        use = P.usage(value.prompt_tokens, len(value.output.token_ids))
                        yield _sse({**body("", None, use), "choices": []})
                else:
                    yield _sse(P.error_body(value.message, value.kind, value.code))
            yield _sse("[DONE]")

        job = Job(
            req.prompt, req.sampling(req.max_tokens), Sink(asyncio.get_running_loop()), stream=req.stream
        )
        return await answer(job, request, body, streamer)

    @router.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest, request: Request) -> Any:
        check_model(req)
        tok = llm.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {name!r} has no chat template (its tokenizer_config.json sets none): "
                                "send a plain prompt to /v1/completions instead", code="no_chat_template")  # fmt: skip
        rid, created = P.new_id("chatcmpl"), int(time.time())

        def body(text: str, reason: str | None, use: dict) -> dict:
            return P.chat_body(rid, name, text, reason, use)

        async def streamer(job: Job, first: Any) -> AsyncIterator[str]:
            yield _sse(P.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}))
            async for kind, value in events(job, first):
                if kind == "text":
                    yield _sse(P.chat_chunk(rid, name, created, {"content": value}))
                elif kind == "end":
                    yield _sse(P.chat_chunk(rid, name, created, {}, value.output.finish_reason))
                    if req.include_usage:
                        use = P.usage(value.prompt_tokens, len(value.output.token_ids))
                        yield _sse({**P.chat_chunk(rid, name, created, {}), "choices": [], "usage": use})
                else:
                    yield _sse(P.error_body(value.message, value.kind, value.code))
            yield _sse("[DONE]")

        sampling = req.sampling(req.token_budget)
        job = Job(req.dialogue(), sampling, Sink(asyncio.get_running_loop()), stream=req.stream, chat=True)
        return await answer(job, request, body, streamer)

    @router.get("/v1/models")
    async def models() -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "moeflow",
                "max_model_len": engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    app.include_router(router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "waiting": engine.waiting, "running": engine.running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
