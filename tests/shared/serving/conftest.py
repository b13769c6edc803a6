"""Fixtures of the serving tests: the tiny random-init model folder (built from its config in seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``tiny:llama`` model folder (greedy, it never emits a stop token: answers run to ``max_tokens``)."""
    from llamaduo.models.resolve import resolve_base_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("tiny-cache")))
        yield Path(resolve_base_model("tiny:llama"))
