"""User code named in a spec as ``package.module:attribute`` (task oracles, judge checkers)."""

from __future__ import annotations

import importlib
from typing import Any


def import_ref(ref: str, where: str, error: type[Exception] = ValueError) -> Any:
    """The object ``ref`` names; raise ``error`` starting with ``where`` (the spec field) when it cannot be had."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise error(f"{where}: must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a module that fails while importing is as unusable as a missing one
        raise error(f"{where}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise error(f"{where}: module {module_name!r} has no attribute {attr!r}") from None
