"""``moeflow serve``: an OpenAI-compatible HTTP server over one :class:`moeflow.LLM`.

``protocol`` owns the wire format, ``loop`` the engine thread and its bounded queue, ``metrics`` the Prometheus
series, ``api_errors`` the OpenAI-style error answers, and ``app`` the FastAPI routes (``create_app``). Needs the ``serve`` extra (fastapi, uvicorn,
prometheus-client).
"""

from __future__ import annotations

from moeflow.server.app import create_app

__all__ = ["create_app"]
