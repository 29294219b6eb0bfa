"""The server's errors as OpenAI-style answers: :class:`APIError` (a status and an ``{"error": {"message", "type",
"param", "code"}}`` body), the answer for whatever the engine thread or the queue raised (``api_error``: 400 for
a :class:`~moeflow.errors.RequestError`, 429 with ``Retry-After`` for a full queue, 503 once stopped, else 500),
and the app's handlers for those, for failed validation and malformed JSON (400) and for Starlette's HTTP errors
(``add_error_handlers``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moeflow.errors import MoeflowError, RequestError
from moeflow.server import protocol as P
from moeflow.server.loop import QueueFull, Stopped


class APIError(Exception):
    """An error answered as an OpenAI-style body with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def api_error(err: BaseException) -> APIError:
    """The HTTP answer for an exception the engine thread or the queue raised."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, RequestError):
        return APIError(400, str(err), code=getattr(err, "code", None))
    if isinstance(err, QueueFull):
        return APIError(
            429, f"server busy: {err}; retry later", "rate_limit_error", headers={"Retry-After": "1"}
        )
    if isinstance(err, Stopped):
        return APIError(503, str(err), "server_error")
    if isinstance(err, MoeflowError):
        return APIError(500, str(err), "server_error")
    return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(P.error_body(err.message, err.kind, err.code), err.status, headers=err.headers)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid request: " + "; ".join(parts)


def add_error_handlers(app: FastAPI) -> None:
    """Answer ``APIError``, failed validation and HTTP errors as OpenAI-style bodies."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, validation_message(exc)))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))
