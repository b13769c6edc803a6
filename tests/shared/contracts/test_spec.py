import json
from pathlib import Path

import pytest
import yaml

from llamaduo.cli.main import main
from llamaduo.contracts.spec import SpecError, load_spec, parse_spec
from llamaduo.tasks.triage import make_dataset

GOOD = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "data.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
}


def write(tmp_path: Path, data: dict) -> Path:
    """The spec as ``spec.yaml``, beside a triage dataset at its ``data.jsonl`` (so the preflight passes)."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_dataset(20, 10)))
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
    no_oracle = {**GOOD, "task": {"name": "t"}, "teacher": {"provider": "simulated"}}
    with pytest.raises(SpecError, match=r"teacher\.provider 'simulated' needs task\.oracle"):
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


# ------------------------------------------------------------------------------ no surprising defaults

OPENAI = {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}


def test_a_spec_without_teacher_or_oracle_is_refused_naming_the_teacher():
    with pytest.raises(SpecError) as err:
        parse_spec({**GOOD, "task": {"name": "t"}})
    message = str(err.value)
    assert "teacher is missing" in message and "simulated" not in message.split("only a task")[0]
    assert parse_spec({**GOOD, "task": {"name": "t"}, "teacher": OPENAI}).teacher.model == "gpt-4o-mini"
    assert parse_spec(GOOD).teacher.provider == "simulated"  # an oracle makes the offline teacher the default


@pytest.mark.parametrize("provider", ["openai", "openai-compatible", "gemini", "local"])
def test_a_provider_that_calls_a_model_needs_its_name(provider):
    teacher = {"provider": provider, "base_url": "http://localhost:8000/v1"}
    with pytest.raises(SpecError, match=rf"teacher: provider '{provider}' needs model"):
        parse_spec({**GOOD, "teacher": teacher})
    assert parse_spec({**GOOD, "teacher": {**teacher, "model": "m"}}).teacher.model == "m"


def test_the_simulated_provider_still_needs_no_model_name():
    assert parse_spec({**GOOD, "teacher": {"provider": "simulated"}}).teacher.model == "oracle"


@pytest.mark.parametrize("gate", ["similarity_mean", "coverage_70"])
@pytest.mark.parametrize("threshold", [0.9, 1])
def test_a_threshold_on_the_0_1_scale_is_refused_with_the_1_100_hint(gate, threshold):
    with pytest.raises(SpecError, match=rf"judge\.threshold: the gate is on the 1-100 scale.*{threshold * 100:g}"):
        parse_spec({**GOOD, "judge": {"gate": gate, "threshold": threshold}})
    assert parse_spec({**GOOD, "judge": {"gate": gate, "threshold": 0}}).judge.threshold == 0
    assert parse_spec({**GOOD, "judge": {"gate": gate, "threshold": 1.5}}).judge.threshold == 1.5


def test_an_unknown_field_suggests_the_field_it_resembles():
    bad = {**GOOD, "teacher": {"provider": "openai", "modle": "gpt-4o"},
           "judge_provider": {**OPENAI, "api_key_ev": "X"}, "judge": {"threshhold": 80}, "budgte": {}}
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    message = str(err.value)
    assert "teacher.modle: unknown field (did you mean 'model'?)" in message
    assert "judge_provider.api_key_ev: unknown field (did you mean 'api_key_env'?)" in message
    assert "judge.threshhold: unknown field (did you mean 'threshold'?)" in message
    assert "budgte: unknown field (did you mean 'budget'?)" in message
    with pytest.raises(SpecError, match=r"student\.lora\.zzz: unknown field \(check the spelling"):
        parse_spec({**GOOD, "student": {**GOOD["student"], "lora": {"zzz": 8}}})
