"""The example specs a user copies (``examples/``) validate out of the box, through the same preflight as
``llamaduo validate``, given their API key; without it they are refused naming the variable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llamaduo.cli.main import main
from llamaduo.cli.preflight import preflight
from llamaduo.contracts.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
#: example -> the variables its providers read the key from
KEYS = {"openai.yaml": "OPENAI_API_KEY", "gemini.yaml": "GEMINI_API_KEY",
        "openai-compatible.yaml": "LLM_SERVER_API_KEY"}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(KEYS)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_an_example_validates_with_its_key(name: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(KEYS[name], "dummy-key")
    path = EXAMPLES / name
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert f"{path}: valid" in capsys.readouterr().out
    spec = load_spec(path)
    assert spec.student.base_model == "smollm2-135m" and spec.dataset.source == str(EXAMPLES / "data/tickets.jsonl")
    assert preflight(spec).problems == []


@pytest.mark.parametrize("name", sorted(KEYS))
def test_an_example_without_its_key_is_refused_naming_the_variable(
        name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for variable in (*KEYS.values(), "GOOGLE_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["validate", str(EXAMPLES / name)]) == 2
    assert f"the environment variable {KEYS[name]} is not set" in capsys.readouterr().err


def test_examples_with_a_cost_budget_price_every_model() -> None:
    for name in KEYS:
        spec = load_spec(EXAMPLES / name)
        if spec.budget.max_cost is not None:
            for provider in (spec.teacher, spec.judge_llm):
                assert provider.price_input_per_mtok is not None and provider.price_output_per_mtok is not None


def test_the_sample_dataset_is_what_its_script_writes() -> None:
    script = EXAMPLES / "data" / "make_tickets.py"
    found = importlib.util.spec_from_file_location("make_tickets", script)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "tickets.jsonl").read_text().splitlines()]
    assert rows == module.make_rows() and len(rows) == module.ROWS
    assert {json.loads(r["response"])["queue"] for r in rows} == set(module.QUEUES)
