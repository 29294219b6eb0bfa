"""Fixtures of the server tests: one tiny OLMoE engine for the session, a copy of it with a chat template, and
an app factory whose TestClient runs the app's lifespan (its engine thread)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient

from moeflow import LLM
from moeflow.server import create_app

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def llm(checkpoints: dict[str, Path]) -> Iterator[LLM]:
    engine = LLM(checkpoints["olmoe"], device="cpu", progress=False, batch_size=4)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat_llm(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    """The same model, with a chat template written into its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat") / "olmoe-chat"
    shutil.copytree(checkpoints["olmoe"], path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    engine = LLM(path, device="cpu", progress=False, batch_size=4)
    yield engine
    engine.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., TestClient]]:
    """``serve(llm, **create_app_kwargs)``: a started TestClient (stopped at the end of the test)."""
    clients: list[TestClient] = []

    def start(engine: Any, **kwargs: Any) -> TestClient:
        client = TestClient(create_app(engine, **kwargs))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def sse_events(lines: list[str]) -> list[Any]:
    """The ``data:`` payloads of a server-sent-event stream (JSON decoded, ``[DONE]`` kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
