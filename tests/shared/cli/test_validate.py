"""``llamaduo validate`` and ``llamaduo migrate`` refuse, before anything starts, every spec that could only fail
later: all problems at once, each naming the field and the fix, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamaduo.cli.main import main
from llamaduo.cli.preflight import preflight
from llamaduo.contracts.spec import load_spec
from llamaduo.tasks.triage import make_dataset

KEY = "LLAMADUO_TEST_PREFLIGHT_KEY"
OPENAI = {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": KEY}


def write(tmp_path: Path, rows: list[dict[str, Any]] | None = None, **sections: Any) -> Path:
    """A spec beside its dataset ``tickets.jsonl`` (60 triage rows unless ``rows``); ``sections`` override."""
    data = rows if rows is not None else make_dataset(n_train=48, n_test=12)
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    spec = {"task": {"name": "triage"}, "dataset": {"source": "tickets.jsonl"},
            "student": {"base_model": "tiny:llama", "method": "full"}, "teacher": OPENAI}
    for name, value in sections.items():
        spec[name] = {**spec.get(name, {}), **value}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY, "sk-dummy")


def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_good_spec_is_valid(tmp_path, capsys):
    code, out = validate(write(tmp_path), capsys)
    assert code == 0 and "valid (task 'triage', student tiny:llama, teacher openai gpt-4o-mini)" in out


def test_a_missing_dataset_is_named(tmp_path, capsys):
    path = write(tmp_path, dataset={"source": "no-such-file.jsonl"})
    code, out = validate(path, capsys)
    assert code == 2
    assert f"dataset.source {tmp_path / 'no-such-file.jsonl'} does not exist" in out


def test_a_column_not_in_the_file_names_the_file_and_its_columns(tmp_path, capsys):
    code, out = validate(write(tmp_path, dataset={"response_column": "answer"}), capsys)
    assert code == 2
    assert (f"dataset.response_column 'answer' is not a column of {tmp_path / 'tickets.jsonl'}; its columns are: "
            "id, instruction, response, split") in out
    assert "s3://" not in out  # the user's file, not the store's copy


def test_an_unset_key_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY)
    code, out = validate(write(tmp_path), capsys)
    assert code == 2 and f"teacher.api_key_env: the environment variable {KEY} is not set" in out
    judge = {"provider": "gemini", "model": "gemini-2.5-flash", "api_key_env": "LLAMADUO_TEST_NO_GEMINI"}
    monkeypatch.setenv(KEY, "sk-dummy")
    code, out = validate(write(tmp_path, judge_provider=judge), capsys)
    assert code == 2 and "judge_provider.api_key_env: the environment variable LLAMADUO_TEST_NO_GEMINI" in out
    # a programmatic judge calls no LLM: its provider's key is not needed
    code, out = validate(write(tmp_path, judge_provider=judge, judge={"method": "programmatic"}), capsys)
    assert code == 0, out


def test_too_few_rows_for_the_splits(tmp_path, capsys):
    code, out = validate(write(tmp_path, dataset={"holdout_size": 200}), capsys)
    assert code == 2 and "dataset.holdout_size 200 needs more rows" in out
    code, out = validate(write(tmp_path, dataset={"train_size": 500}), capsys)
    assert code == 2 and "dataset.train_size 500 needs more rows" in out


def test_bad_rows_are_refused_with_their_numbers(tmp_path, capsys):
    rows = [*make_dataset(n_train=20, n_test=5), {"instruction": "", "response": "x", "split": "train"}]
    code, out = validate(write(tmp_path, rows=rows), capsys)
    assert code == 2 and "row 26: empty instruction" in out


def test_an_unpriced_model_under_a_cost_budget_is_refused(tmp_path, capsys):
    path = write(tmp_path, teacher={"model": "my-finetune"}, budget={"max_cost": 5})
    code, out = validate(path, capsys)
    assert code == 2 and "teacher.model 'my-finetune' has no price" in out
    priced = write(tmp_path, teacher={"model": "my-finetune", "price_input_per_mtok": 1, "price_output_per_mtok": 2},
                   budget={"max_cost": 5})
    assert validate(priced, capsys)[0] == 0


def test_base_models_are_resolved_without_downloading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = validate(write(tmp_path, student={"base_model": "no-such-org/no-such-model-xyz"}), capsys)
    assert code == 2 and "`llamaduo pull no-such-org/no-such-model-xyz`" in out
    code, out = validate(write(tmp_path, student={"base_model": "tiny:nope"}), capsys)
    assert code == 2 and "unknown tiny preset 'nope'" in out
    code, out = validate(write(tmp_path, student={"base_model": "./no/such/folder"}), capsys)
    assert code == 2 and "neither an existing folder nor a Hugging Face id" in out
    (tmp_path / "my-model").mkdir()
    assert validate(write(tmp_path, student={"base_model": str(tmp_path / "my-model")}), capsys)[0] == 0


def test_a_hub_that_does_not_answer_is_not_a_problem_but_is_said(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    spec = load_spec(write(tmp_path, student={"base_model": "no-such-org/no-such-model-xyz"}))
    checked = preflight(spec)
    assert checked.problems == []
    assert any("the Hugging Face Hub did not answer" in note for note in checked.unchecked), checked.unchecked


def test_every_problem_is_reported_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write(tmp_path, dataset={"instruction_column": "question"}, teacher={"model": "my-finetune"},
                 student={"base_model": "no-such-org/no-such-model-xyz"}, budget={"max_cost": 1})
    code, out = validate(path, capsys)
    assert code == 2 and "4 problem(s)" in out
    for field in ("dataset.instruction_column", "teacher.model", "teacher.api_key_env", "student.base_model"):
        assert f"  - {field}" in out
    assert "Traceback" not in out


def test_a_dataset_in_s3_is_said_to_be_unchecked(tmp_path, capsys):
    code, out = validate(write(tmp_path, dataset={"source": "s3://bucket/tickets.jsonl"}), capsys)
    assert code == 0 and "not checked: dataset.source s3://bucket/tickets.jsonl" in out


def test_migrate_refuses_before_starting_anything(tmp_path, capsys):
    path = write(tmp_path, dataset={"source": "missing.jsonl"})
    code = main(["migrate", str(path), "--embedded", "--data-dir", str(tmp_path / "install"), "--no-live"])
    captured = capsys.readouterr()
    assert code == 2 and "dataset.source" in captured.err and "does not exist" in captured.err
    assert "starting embedded" not in captured.out and not (tmp_path / "install").exists()
    # against a running installation too (keys are its services' business, the dataset is uploaded from here)
    assert main(["migrate", str(path), "--no-live"]) == 2
    assert "does not exist" in capsys.readouterr().err
