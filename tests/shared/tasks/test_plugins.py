"""User code named in a spec: references that load, and ones refused with the spec field and the reason."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaduo.contracts.spec import parse_spec
from llamaduo.errors import SpecError
from llamaduo.tasks.plugins import CheckerError, import_ref, load_user_checker, spec_code_problems

USER_CODE = '''
def share(instruction, reference, candidate):
    return 1.0 if reference == candidate else 0.0

def two_args(reference, candidate):
    return 1.0

NOT_CALLABLE = 3

class Oracle:
    name = "mine"
    def propose(self, seeds, n, seed):
        return ["x"] * n
    def answer(self, instruction):
        return "y"
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_code_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LLAMADUO_ALLOWED_PLUGINS", f"{name},{name}_broken")  # the operator allows them
    yield name
    for module in (name, f"{name}_broken"):
        sys.modules.pop(module, None)


def test_import_ref_returns_the_named_object(user_module: str) -> None:
    assert import_ref(f"{user_module}:NOT_CALLABLE", "task.oracle") == 3


@pytest.mark.parametrize(("ref", "why"), [
    ("no_colon", "must look like 'package.module:attribute'"),
    ("{m}:", "must look like 'package.module:attribute'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    ("{m}_broken:f", "RuntimeError: boom at import"),
    ("{m}:missing", "has no attribute 'missing'"),
])
def test_import_ref_refusals_name_the_field(user_module: str, ref: str, why: str) -> None:
    with pytest.raises(SpecError) as info:
        import_ref(ref.format(m=user_module), "judge.checker 'x'")
    assert str(info.value).startswith("judge.checker 'x': ") and why in str(info.value)


def test_user_checker_loads_a_function_of_three_texts(user_module: str) -> None:
    checker = load_user_checker(f"{user_module}:share")
    assert checker("i", "a", "a") == 1.0


@pytest.mark.parametrize(("attr", "why"), [
    ("two_args", "must accept (instruction, reference, candidate)"),
    ("NOT_CALLABLE", "it is a int, not a function"),
])
def test_user_checker_refusals(user_module: str, attr: str, why: str) -> None:
    with pytest.raises(CheckerError) as info:
        load_user_checker(f"{user_module}:{attr}")
    assert f"judge.checker '{user_module}:{attr}'" in str(info.value) and why in str(info.value)


def test_a_name_that_is_no_builtin_and_no_reference_lists_the_builtins() -> None:
    with pytest.raises(CheckerError, match="must be one of \\['exact', 'json_fields', 'normalised'\\]"):
        load_user_checker("fuzzy")


def spec(oracle: str, checker: str) -> object:
    return parse_spec({
        "task": {"name": "t", "oracle": oracle}, "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama"}, "judge": {"method": "programmatic", "checker": checker},
    })


def test_spec_code_problems_reports_every_reference_that_cannot_load(user_module: str) -> None:
    assert spec_code_problems(spec(f"{user_module}:Oracle", f"{user_module}:share")) == []
    assert spec_code_problems(spec(f"{user_module}:Oracle", "json_fields")) == []
    problems = spec_code_problems(spec(f"{user_module}:missing", f"{user_module}:two_args"))
    assert len(problems) == 2
    assert problems[0].startswith(f"task.oracle '{user_module}:missing'")
    assert problems[1].startswith(f"judge.checker '{user_module}:two_args'")
