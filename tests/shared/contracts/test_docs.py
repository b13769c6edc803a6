"""The committed contract in docs/ must be what the code generates (run `make docs` after a change)."""

from pathlib import Path

import yaml

from llamaduo.contracts.docs import asyncapi_yaml, json_schemas, spec_markdown

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_asyncapi_document_is_current():
    committed = (DOCS / "asyncapi.yaml").read_text()
    assert committed == asyncapi_yaml(), "docs/asyncapi.yaml is stale: run `make docs` and commit it"


def test_asyncapi_covers_every_subject_with_payload_schema():
    doc = yaml.safe_load(asyncapi_yaml())
    addresses = {ch["address"] for ch in doc["channels"].values()}
    for subject in ("migration.start", "train.request", "train.done", "infer.done", "judge.request",
                    "eval.scored", "synth.request", "synth.ready", "migration.completed", "migration.failed"):
        assert subject in addresses, subject
    schemas = doc["components"]["schemas"]
    assert any("JudgeRequest" in name for name in schemas)


def test_json_schemas_are_current():
    for name, text in json_schemas().items():
        assert (DOCS / "schemas" / name).read_text() == text, f"docs/schemas/{name} is stale: run `make docs`"


def test_spec_reference_is_current():
    text = spec_markdown()
    assert (DOCS / "spec.md").read_text() == text, "docs/spec.md is stale: run `make docs`"
    assert "| `judge.threshold` | float | 90 |" in text
