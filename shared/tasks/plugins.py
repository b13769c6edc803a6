"""User code named in a spec as ``package.module:attribute``: task oracles and judge checkers.

:func:`spec_code_problems` tells, before anything starts, which of a spec's references cannot be loaded here;
``llamaduo validate`` and the embedded ``migrate`` use it, and so do the services that load the code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llamaduo.contracts.spec import BUILTIN_CHECKERS
from llamaduo.errors import SpecError

if TYPE_CHECKING:
    from llamaduo.contracts.spec import MigrationSpec


class CheckerError(SpecError):
    """A ``judge.checker`` that cannot be used, or a built-in checker that cannot score an item."""


def import_ref(ref: str, where: str, error: type[Exception] = SpecError) -> Any:
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


def load_user_checker(ref: str) -> Callable[[str, str, str], Any]:
    """The user's checker function ``package.module:function`` named by ``judge.checker``.

    It must accept ``(instruction, reference, candidate)``; raise :class:`CheckerError` naming the spec field
    and what is wrong otherwise (built-in checker names are the judge's, see ``BUILTIN_CHECKERS``).
    """
    where = f"judge.checker {ref!r}"
    if ":" not in ref:
        raise CheckerError(f"{where}: must be one of {sorted(BUILTIN_CHECKERS)} or 'package.module:function'")
    function = import_ref(ref, where, CheckerError)
    if not callable(function):
        raise CheckerError(f"{where}: it is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind("instruction", "reference", "candidate")
    except TypeError as err:
        raise CheckerError(f"{where}: must accept (instruction, reference, candidate): {err}") from None
    except ValueError:  # no signature to inspect (some built-ins): calling it will tell
        pass
    return function


def spec_code_problems(spec: MigrationSpec) -> list[str]:
    """The spec's user code (task oracle, judge checker) that cannot be loaded on this machine, one line each."""
    from llamaduo.tasks.oracle import load_oracle

    problems = []
    if spec.task.oracle:
        try:
            load_oracle(spec.task.oracle)
        except SpecError as err:
            problems.append(str(err))
    if spec.judge.method == "programmatic" and spec.judge.checker not in BUILTIN_CHECKERS:
        try:
            load_user_checker(spec.judge.checker)
        except SpecError as err:
            problems.append(str(err))
    return problems
