"""The plugin trust boundary: code a spec names loads only from installed entry points and the operator's
allowlist; anything else is refused, naming the field, before it is imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llamaduo.cli.main import main
from llamaduo.contracts.spec import MigrationSpec, parse_spec
from llamaduo.settings import Settings
from llamaduo.tasks.oracle import OracleError, load_oracle
from llamaduo.tasks.plugins import (
    CHECKERS,
    ORACLES,
    CheckerError,
    installed_plugins,
    load_user_checker,
    refused_code,
    spec_code_problems,
    trusted_ref,
)


def spec(oracle: str = "llamaduo.tasks.triage:oracle", checker: str = "exact") -> MigrationSpec:
    return parse_spec({
        "task": {"name": "t", "oracle": oracle}, "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama"}, "judge": {"method": "programmatic", "checker": checker},
    })


def test_shipped_oracles_are_installed_entry_points() -> None:
    assert installed_plugins(ORACLES) == {"triage": "llamaduo.tasks.triage:oracle",
                                          "invoice": "llamaduo.tasks.invoice:oracle"}
    assert trusted_ref("triage", ORACLES, Settings()) == "llamaduo.tasks.triage:oracle"
    assert trusted_ref("llamaduo.tasks.invoice:oracle", ORACLES, Settings()) == "llamaduo.tasks.invoice:oracle"
    assert load_oracle("triage").name == load_oracle("llamaduo.tasks.triage:oracle").name
    assert refused_code(spec("llamaduo.tasks.invoice:oracle", "json_fields")) == []


@pytest.mark.parametrize("ref", ["os:abort", "shutil:rmtree", "llamaduo.storage.store:ArtifactStore"])
def test_dangerous_refs_are_refused_naming_the_field(ref: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMADUO_ALLOWED_PLUGINS", raising=False)
    problems = refused_code(spec(oracle=ref, checker=ref))
    assert len(problems) == 2
    assert problems[0].startswith(f"task.oracle {ref!r}: refused: not an installed 'llamaduo.oracles' entry point")
    assert problems[1].startswith(f"judge.checker {ref!r}: refused: not an installed 'llamaduo.checkers'")
    assert all("LLAMADUO_ALLOWED_PLUGINS" in p for p in problems)
    with pytest.raises(OracleError, match=rf"^task\.oracle {ref!r}: refused"):
        load_oracle(ref)
    with pytest.raises(CheckerError, match=rf"^judge\.checker {ref!r}: refused"):
        load_user_checker(ref)


def test_a_module_not_allowed_is_refused_before_it_is_imported(marking_module: tuple[str, Path]) -> None:
    name, mark = marking_module
    ref = f"{name}:check"
    with pytest.raises(CheckerError, match=r"^judge\.checker .*: refused"):
        load_user_checker(ref)
    with pytest.raises(OracleError, match=r"^task\.oracle .*: refused"):
        load_oracle(ref)
    problems = spec_code_problems(spec(oracle=ref, checker=ref))
    assert [p.split(":")[0] for p in problems] == [f"task.oracle '{name}", f"judge.checker '{name}"]
    assert not mark.exists() and name not in sys.modules


@pytest.mark.parametrize("allow", ["{m}", "{m}:check", "other, {m}"])
def test_the_operator_allowlist_lets_a_module_or_a_ref_through(marking_module: tuple[str, Path],
                                                                allow: str) -> None:
    name, mark = marking_module
    settings = Settings(allowed_plugins=allow.format(m=name))
    assert load_user_checker(f"{name}:check", settings)("i", "a", "a") == 1.0
    assert mark.exists()


def test_a_prefix_allows_submodules_only_not_lookalikes() -> None:
    settings = Settings(allowed_plugins="my_tasks, exact.mod:f")
    assert trusted_ref("my_tasks:f", CHECKERS, settings) == "my_tasks:f"
    assert trusted_ref("my_tasks.sub:f", CHECKERS, settings) == "my_tasks.sub:f"
    assert trusted_ref("my_tasks_evil:f", CHECKERS, settings) is None
    assert trusted_ref("exact.mod:g", CHECKERS, settings) is None
    assert trusted_ref("exact.mod:f", CHECKERS, settings) == "exact.mod:f"


def test_allowlist_setting_reads_a_comma_separated_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_ALLOWED_PLUGINS", " a.b:c ,d ")
    assert Settings().allowed_plugins == ["a.b:c", "d"]
    assert trusted_ref("d.e:f", CHECKERS) == "d.e:f"


@pytest.mark.parametrize("field", ["oracle", "checker"])
@pytest.mark.parametrize("ref", ["os:abort", "shutil:rmtree", "{m}:check"])
def test_llamaduo_validate_refuses_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    marking_module: tuple[str, Path], field: str, ref: str) -> None:
    name, mark = marking_module
    ref = ref.format(m=name)
    data = {"task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"}, "dataset": {"source": "d.jsonl"},
            "student": {"base_model": "tiny:llama", "method": "full"},
            "judge": {"method": "programmatic", "checker": "exact"}}
    if field == "oracle":
        data["task"]["oracle"] = ref
    else:
        data["judge"]["checker"] = ref
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    where = "task.oracle" if field == "oracle" else "judge.checker"
    assert f"{where} {ref!r}: refused: not an installed" in err
    assert not mark.exists()
