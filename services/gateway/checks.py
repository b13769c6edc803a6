"""Hooks a route names in routes.yaml: the validator of local answers and the redaction of captured text.

Both are trusted operator configuration, yet user code still loads only through the plugin rules
(:mod:`llamaduo.tasks.plugins`): an installed entry point of :data:`VALIDATORS` / :data:`REDACTORS`, or a
``module:function`` the operator's ``LLAMADUO_ALLOWED_PLUGINS`` lets through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from llamaduo.data.text import strip_code_fence
from llamaduo.errors import SpecError
from llamaduo.services.gateway.config import ValidatorConfig
from llamaduo.tasks.plugins import load_trusted

#: Entry-point group of answer validators a routes file may name (``validator.checker``).
VALIDATORS = "llamaduo.validators"
#: Entry-point group of redaction hooks a routes file may name (``redact``).
REDACTORS = "llamaduo.redactors"

#: ``validate(answer) -> None`` when the answer may be shown, else why not.
Validator = Callable[[str], "str | None"]
#: ``redact(text) -> text`` with what must not be stored masked.
Redactor = Callable[[str], str]

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
#: Six or more digits, possibly grouped by spaces or dashes (card, account, phone numbers).
_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){5,}")


def redact_emails_and_numbers(text: str) -> str:
    """Mask e-mail addresses (``[email]``) and runs of six or more digits (``[number]``)."""
    return _DIGIT_RUN.sub("[number]", _EMAIL.sub("[email]", text))


BUILTIN_REDACTORS: dict[str, Redactor] = {"emails_and_numbers": redact_emails_and_numbers}


def _json_value(answer: str) -> Any:
    return json.loads(strip_code_fence(answer))


def check_json_object(answer: str) -> str | None:
    """The answer is one JSON object (a code fence around it is allowed)."""
    try:
        value = _json_value(answer)
    except ValueError as err:
        return f"not JSON: {err}"
    return None if isinstance(value, dict) else f"JSON {type(value).__name__}, not an object"


def check_non_empty(answer: str) -> str | None:
    """The answer holds some non-space text."""
    return None if answer.strip() else "empty answer"


BUILTIN_VALIDATORS: dict[str, Validator] = {"json_object": check_json_object, "non_empty": check_non_empty}


def schema_validator(schema: dict[str, Any], where: str) -> Validator:
    """A validator accepting answers that are JSON valid against ``schema`` (checked now: a bad schema is a
    :class:`SpecError` naming ``where``)."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise SpecError(f"{where}.json_schema is not a valid JSON Schema: {err.message}") from None
    checker = cls(schema)

    def validate(answer: str) -> str | None:
        try:
            value = _json_value(answer)
        except ValueError as err:
            return f"not JSON: {err}"
        error = jsonschema.exceptions.best_match(checker.iter_errors(value))
        if error is None:
            return None
        path = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"schema: {path}: {error.message}"[:300]

    return validate


def _user_validator(function: Callable[[str], Any]) -> Validator:
    def validate(answer: str) -> str | None:
        result = function(answer)
        if result is True or result is None:
            return None
        return "rejected by the validator" if result is False else str(result)[:300]

    return validate


def make_validator(config: ValidatorConfig | None, where: str) -> Validator | None:
    """The route's validator (None when it has none); raise :class:`SpecError` naming ``where`` when it cannot
    be had (untrusted code is refused before it is imported)."""
    if config is None:
        return None
    if config.json_schema is not None:
        return schema_validator(config.json_schema, where)
    assert config.checker is not None
    if config.checker in BUILTIN_VALIDATORS:
        return BUILTIN_VALIDATORS[config.checker]
    if ":" not in config.checker:
        raise SpecError(f"{where}.checker {config.checker!r}: use one of {sorted(BUILTIN_VALIDATORS)} or "
                        "'module:function'")
    function = load_trusted(config.checker, f"{where}.checker {config.checker!r}", VALIDATORS)
    if not callable(function):
        raise SpecError(f"{where}.checker {config.checker!r}: not a function")
    return _user_validator(function)


def make_redactor(ref: str | None, where: str) -> Redactor | None:
    """The route's redaction hook (None when it has none); :class:`SpecError` naming ``where`` otherwise."""
    if ref is None:
        return None
    if ref in BUILTIN_REDACTORS:
        return BUILTIN_REDACTORS[ref]
    if ":" not in ref:
        raise SpecError(f"{where}.redact {ref!r}: use {sorted(BUILTIN_REDACTORS)} or 'module:function'")
    function = load_trusted(ref, f"{where}.redact {ref!r}", REDACTORS)
    if not callable(function):
        raise SpecError(f"{where}.redact {ref!r}: not a function")
    return function  # type: ignore[no-any-return]
