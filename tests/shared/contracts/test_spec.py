from pathlib import Path

import pytest
import yaml

from llamaduo.cli.main import main
from llamaduo.contracts.spec import SpecError, load_spec, parse_spec

GOOD = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "data.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_spec_resolves_relative_dataset(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.dataset.source == str(tmp_path / "data.jsonl")
    assert spec.judge_llm.provider == "simulated"
    assert spec.budget.max_rounds >= 1


def test_unknown_field_is_named(tmp_path):
    bad = {**GOOD, "student": {**GOOD["student"], "lora": {"rank": 8}}}
    with pytest.raises(SpecError, match=r"student\.lora\.rank: unknown field"):
        load_spec(write(tmp_path, bad))


def test_every_bad_field_is_reported_at_once():
    bad = {**GOOD, "judge": {"threshold": 150}, "budget": {"max_rounds": 0}}
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert "judge.threshold" in str(err.value) and "budget.max_rounds" in str(err.value)


def test_simulated_needs_oracle_and_quantized_needs_lora():
    no_oracle = {**GOOD, "task": {"name": "t"}}
    with pytest.raises(SpecError, match=r"needs task\.oracle"):
        parse_spec(no_oracle)
    with pytest.raises(SpecError, match="QLoRA"):
        parse_spec({**GOOD, "student": {"base_model": "x", "method": "full", "quantization": "4bit"}})


def test_oracle_reference_format():
    with pytest.raises(SpecError, match=r"package\.module:attribute"):
        parse_spec({**GOOD, "task": {"name": "t", "oracle": "no_colon"}})


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, GOOD))]) == 0
    assert main(["validate", str(write(tmp_path, {**GOOD, "extra": 1}))]) == 2
    assert "extra: unknown field" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_cli_validate_loads_the_user_code_the_spec_names(tmp_path, capsys, monkeypatch):
    # the operator allows these modules, so validate goes on to import them (and finds them unusable)
    monkeypatch.setenv("LLAMADUO_ALLOWED_PLUGINS", "no_such_module_xyz,llamaduo.contracts.spec:no_such_checker")
    bad_oracle = {**GOOD, "task": {**GOOD["task"], "oracle": "no_such_module_xyz:oracle"}}
    assert main(["validate", str(write(tmp_path, bad_oracle))]) == 2
    err = capsys.readouterr().err
    assert "task.oracle 'no_such_module_xyz:oracle': cannot import module 'no_such_module_xyz'" in err
    bad_checker = {**GOOD, "judge": {"method": "programmatic", "checker": "llamaduo.contracts.spec:no_such_checker"}}
    assert main(["validate", str(write(tmp_path, bad_checker))]) == 2
    assert ("judge.checker 'llamaduo.contracts.spec:no_such_checker': module 'llamaduo.contracts.spec' has no "
            "attribute") in capsys.readouterr().err
    good_checker = {**GOOD, "judge": {"method": "programmatic", "checker": "json_fields"}}
    assert main(["validate", str(write(tmp_path, good_checker))]) == 0
