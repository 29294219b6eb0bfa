"""Reading prompt files: one prompt per line with ``\\n`` for a line break, or ``.jsonl`` of {"prompt": ...}."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.errors import RequestError


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from ``path``; blank lines are skipped. Raises RequestError naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"prompt file {path} does not exist")
    prompts: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompt = obj["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RequestError(f'{path}:{i}: expected a JSON object with a "prompt" string') from None
            if not isinstance(prompt, str):
                raise RequestError(f'{path}:{i}: "prompt" must be a string')
            prompts.append(prompt)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise RequestError(f"prompt file {path} holds no prompts")
    return prompts
