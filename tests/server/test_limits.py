"""The longest sequence served: unset, 4096 positions or the model's context if shorter; asked, at most the context."""

from __future__ import annotations

import pytest

from moeflow.errors import ConfigError
from moeflow.server.limits import DEFAULT_MAX_MODEL_LEN, resolve_max_model_len


def test_default_is_capped_so_a_long_context_model_does_not_reserve_its_whole_context() -> None:
    assert resolve_max_model_len(None, 32768) == DEFAULT_MAX_MODEL_LEN == 4096
    assert resolve_max_model_len(None, 256) == 256
    assert resolve_max_model_len(None, None) is None


def test_asked_length_is_kept_up_to_the_context() -> None:
    assert resolve_max_model_len(32768, 32768) == 32768
    assert resolve_max_model_len(100, 256) == 100
    with pytest.raises(ConfigError, match="beyond the model's context of 256"):
        resolve_max_model_len(257, 256)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_max_model_len(0, 256)
