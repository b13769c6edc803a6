"""Fixtures of the gateway tests: the local model's base, a tiny random-init model built from its config."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamaduo.models.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", folder)
    return folder
