"""Kernel tests in Triton's interpreter on the CPU: a script runs in a child process (``TRITON_INTERPRET=1`` must be
set before Triton is imported) with the package on its path, and must print "ok"."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)

SHIM = """
import triton.runtime.interpreter as _interp

# Triton 3.6's interpreter turns a loaded loop bound into an int with int(1-element array), which NumPy 2.4 refuses:
# index through the element instead (the compiled kernels are unaffected)
_patch = _interp._patch_lang_tensor


def _patch_index(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patch_index
"""


def run_interpreted(script: str, timeout: int = 900) -> None:
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(p for p in (str(root / "src"), str(root), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", SHIM + script], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=root)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
