"""User code named in a spec as ``package.module:attribute``: task oracles and judge checkers.

The trust boundary: a spec travels on the bus, so the code it names loads only from what the operator
installed and allowed, never from whatever happens to be importable.

* Installed entry points: group :data:`ORACLES` (``llamaduo.oracles``) for ``task.oracle`` and group
  :data:`CHECKERS` (``llamaduo.checkers``) for ``judge.checker``. A spec names one by its entry-point name or by
  the exact ``module:attr`` it points to (the shipped oracles: ``llamaduo.tasks.triage:oracle``, ...).
* The operator's allowlist ``LLAMADUO_ALLOWED_PLUGINS`` (:attr:`llamaduo.settings.Settings.allowed_plugins`):
  exact ``module:attr`` refs, or module prefixes (``my_tasks`` allows ``my_tasks`` and ``my_tasks.*``).

Anything else is refused before any import (:func:`refused_code`); the loaders apply it first, and
:func:`spec_code_problems` (``llamaduo validate``, the embedded ``migrate``) reports it too.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from llamaduo.contracts.spec import BUILTIN_CHECKERS
from llamaduo.errors import SpecError

if TYPE_CHECKING:
    from llamaduo.contracts.spec import MigrationSpec
    from llamaduo.settings import Settings

#: Entry-point group of task oracles a spec may name in ``task.oracle``.
ORACLES = "llamaduo.oracles"
#: Entry-point group of judge checkers a spec may name in ``judge.checker``.
CHECKERS = "llamaduo.checkers"

ALLOWLIST_SETTING = "LLAMADUO_ALLOWED_PLUGINS"


class CheckerError(SpecError):
    """A ``judge.checker`` that cannot be used, or a built-in checker that cannot score an item."""


def installed_plugins(group: str) -> dict[str, str]:
    """The entry points of ``group`` installed here: name -> ``module:attr`` (nothing is imported)."""
    return {ep.name: f"{ep.module}:{ep.attr}" for ep in entry_points(group=group) if ep.attr}


def _allowed_by_list(ref: str, allowlist: list[str]) -> bool:
    module = ref.partition(":")[0]
    for allowed in allowlist:
        allowed = allowed.strip()
        if not allowed:
            continue
        if ":" in allowed:
            if ref == allowed:
                return True
        elif module == allowed or module.startswith(allowed.rstrip(".") + "."):
            return True
    return False


def trusted_ref(ref: str, group: str, settings: Settings | None = None) -> str | None:
    """The ``module:attr`` that ``ref`` may load, or None when it is not installed in ``group`` nor allowed.

    ``ref`` is an entry-point name of ``group``, the exact value of one, or a ref the operator's allowlist
    (``settings.allowed_plugins``; read from the environment when ``settings`` is None) lets through.
    """
    ref = ref.strip()
    installed = installed_plugins(group)
    if ref in installed:
        return installed[ref]
    if ref in installed.values():
        return ref
    if ":" not in ref:
        return None
    if settings is None:
        from llamaduo.settings import Settings

        settings = Settings()
    return ref if _allowed_by_list(ref, settings.allowed_plugins) else None


def refusal(ref: str, where: str, group: str, settings: Settings | None = None) -> str | None:
    """Why ``ref`` (the spec field ``where``) may not load here, starting with ``where``; None when it may."""
    if trusted_ref(ref, group, settings) is not None:
        return None
    names = ", ".join(sorted(installed_plugins(group))) or "none"
    return (f"{where}: refused: not an installed {group!r} entry point (installed: {names}) nor allowed by "
            f"{ALLOWLIST_SETTING}; the operator registers user code as an entry point or in that setting "
            "(see docs/oracle.md)")


def refused_code(spec: MigrationSpec, settings: Settings | None = None) -> list[str]:
    """The spec's code references (task oracle, programmatic judge checker) that are not trusted, one line each
    naming the field. Nothing is imported: call it before loading anything a spec names."""
    problems = []
    if spec.task.oracle and (why := refusal(spec.task.oracle, f"task.oracle {spec.task.oracle!r}", ORACLES,
                                            settings)):
        problems.append(why)
    checker = spec.judge.checker
    if spec.judge.method == "programmatic" and checker not in BUILTIN_CHECKERS and (
        why := refusal(checker, f"judge.checker {checker!r}", CHECKERS, settings)
    ):
        problems.append(why)
    return problems


def import_ref(ref: str, where: str, error: type[Exception] = SpecError) -> Any:
    """The object ``ref`` names; raise ``error`` starting with ``where`` (the spec field) when it cannot be had.

    This is the bare import, with no trust check: the loaders below call it only on a :func:`trusted_ref`.
    """
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


def load_trusted(ref: str, where: str, group: str, error: type[Exception] = SpecError,
                 settings: Settings | None = None) -> Any:
    """The object ``ref`` names when it is trusted (see :func:`trusted_ref`); raise ``error`` naming ``where``
    before importing anything when it is not."""
    resolved = trusted_ref(ref, group, settings)
    if resolved is None:
        raise error(refusal(ref, where, group, settings))
    return import_ref(resolved, where, error)


def load_user_checker(ref: str, settings: Settings | None = None) -> Callable[[str, str, str], Any]:
    """The user's checker function named by ``judge.checker``: an installed ``llamaduo.checkers`` entry point
    (by name or ``module:function``) or a ref ``LLAMADUO_ALLOWED_PLUGINS`` allows.

    It must accept ``(instruction, reference, candidate)``; raise :class:`CheckerError` naming the spec field
    and what is wrong otherwise, refusing untrusted code before importing it (built-in checker names are the
    judge's, see ``BUILTIN_CHECKERS``).
    """
    where = f"judge.checker {ref!r}"
    if ":" not in ref and ref not in installed_plugins(CHECKERS):
        raise CheckerError(f"{where}: must be one of {sorted(BUILTIN_CHECKERS)} or 'package.module:function'")
    function = load_trusted(ref, where, CHECKERS, CheckerError, settings)
    if not callable(function):
        raise CheckerError(f"{where}: it is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind("instruction", "reference", "candidate")
    except TypeError as err:
        raise CheckerError(f"{where}: must accept (instruction, reference, candidate): {err}") from None
    except ValueError:  # no signature to inspect (some built-ins): calling it will tell
        pass
    return function


def spec_code_problems(spec: MigrationSpec, settings: Settings | None = None) -> list[str]:
    """The spec's user code (task oracle, judge checker) that is refused (:func:`refused_code`) or cannot be
    loaded on this machine, one line each naming the field. Refused code is never imported."""
    from llamaduo.tasks.oracle import load_oracle

    problems = refused_code(spec, settings)
    if spec.task.oracle and not any(p.startswith("task.oracle ") for p in problems):
        try:
            load_oracle(spec.task.oracle, settings)
        except SpecError as err:
            problems.append(str(err))
    checker = spec.judge.checker
    if (spec.judge.method == "programmatic" and checker not in BUILTIN_CHECKERS
            and not any(p.startswith("judge.checker ") for p in problems)):
        try:
            load_user_checker(checker, settings)
        except SpecError as err:
            problems.append(str(err))
    return problems
