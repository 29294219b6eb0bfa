"""Fuzzing the entry points with random values: the console script's argument parsing, ``SamplingParams`` and
``EngineConfig``. Invalid input must end in a moeflow error (one line, exit 2 from the CLI), never a traceback;
valid input must run. Bounded (max_examples, deadline) to well under a minute."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeflow import EngineConfig, SamplingParams
from moeflow.errors import MoeflowError
from tests.cli.helpers import one_error_line, run

junk = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["0", "-1", "nan", "inf", "1e400", "25%", "0.5", "2.0", "", " ", "1GiB", "=", "a=b"]),
)  # fmt: skip
FLAGS = ["--max-tokens", "--temperature", "--top-k", "--top-p", "--batch-size", "--cache-size", "--num-slots",
         "--device", "--dtype", "--expert-backend", "--device-memory", "--host-memory", "--option", "--seed",
         "--policy"]  # fmt: skip
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), junk), min_size=1, max_size=3))
def test_generate_flags_never_trace_back(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str], flags: list[tuple[str, object]]
) -> None:
    argv = ["generate", "--model", str(checkpoints["olmoe"]), "--prompt", "hi", "--max-tokens", "1"]
    for flag, value in flags:
        argv += [flag, str(value)]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    code, out, err = run(argv, capsys)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        assert out.startswith("hi")
    else:
        assert code == 2, err
        assert one_error_line(err).split(": error: ")[0] in ("moeflow", "moeflow generate")


@FAST
@given(values=st.lists(st.tuples(st.sampled_from(["--cache-size", "--bandwidth", "--batch-size",
                                                  "--compute-per-layer-ms", "--expert-bytes"]), junk),
                       min_size=1, max_size=3))  # fmt: skip
def test_simulate_flags_never_trace_back(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    values: list[tuple[str, object]],
) -> None:
    argv = ["simulate", "--trace", str(tmp_path_factory.getbasetemp() / "none.npz"), "--policy", "lru"]
    if not any(f == "--cache-size" for f, _ in values):
        argv += ["--cache-size", "4"]
    for flag, value in values:
        argv += [flag, str(value)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    one_error_line(err)  # a bad value, or else the missing trace


@settings(max_examples=200, deadline=None)
@given(
    max_tokens=junk, temperature=junk, top_k=junk, top_p=junk,
    stop=st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)), seed=st.one_of(st.none(), junk),
)  # fmt: skip
def test_sampling_params_accept_or_refuse_cleanly(**kw: object) -> None:
    try:
        p = SamplingParams(**kw)  # type: ignore[arg-type]
    except MoeflowError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(p.max_tokens, int) and p.max_tokens >= 1
    assert math.isfinite(p.temperature) and p.temperature >= 0 and 0 < p.top_p <= 1
    assert all(isinstance(s, str) and s for s in p.stop)


@settings(max_examples=200, deadline=None)
@given(
    device=st.one_of(st.sampled_from(["cpu", "auto", "cuda:0", "meta", "tpu"]), st.text(max_size=5)),
    dtype=st.one_of(st.sampled_from(["auto", "bfloat16", "int8"]), junk),
    num_slots=st.one_of(st.none(), junk), device_memory=st.one_of(st.none(), junk), max_wait=junk,
    expert_backend=st.sampled_from(["auto", "loop", "batched", "grouped", "triton", "x"]),
)  # fmt: skip
def test_engine_config_accepts_or_refuses_cleanly(**kw: object) -> None:
    try:
        cfg = EngineConfig(**kw)  # type: ignore[arg-type]
    except MoeflowError as exc:
        assert "\n" not in str(exc)
        return
    assert cfg.device in ("cpu", "auto", "cuda:0") or cfg.device.startswith("cuda")
    assert cfg.num_slots is None or cfg.num_slots >= 1
    assert cfg.device_memory is None or cfg.device_memory >= 0
