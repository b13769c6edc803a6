"""The committed contract in docs/ must be what the code generates (run `make docs` after a change)."""

import json
import re
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
    assert "| `judge.threshold` | number, 0 to 100 | `90` |" in text


def test_spec_reference_speaks_user_words_not_python_types():
    """Types in words (integer, optional number, one of: ...), sections by their path, every meaning filled in."""
    rows = [line.split(" | ") for line in spec_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    python_words = re.compile(r"\b(Literal|Union|Optional|None|int|float|str|bool|Any)\b|Spec\b|\[")
    for field, type_text, _default, meaning in rows:
        assert not python_words.search(type_text), (field, type_text)
        assert meaning.strip(" |"), f"{field} has no meaning in docs/spec.md"
    types = {row[0].strip("| `"): row[1] for row in rows}
    assert types["student.method"] == "one of: lora, full"
    assert types["dataset.test_size"] == "optional integer, >= 1"
    assert types["student.lora.target_modules"] == 'list of text or "all-linear"'
    assert types["judge_provider"] == "optional section, the fields of `teacher`"
    assert "## `student.lora`" in spec_markdown()


def test_start_schema_references_the_spec_schema():
    """The start payload's spec is not a free object: the JSON Schema and the AsyncAPI document point at the spec."""
    schemas = json_schemas()
    start = json.loads(schemas["migration.start.schema.json"])
    assert start["$defs"]["MigrationStart"]["properties"]["spec"]["$ref"] == "spec.schema.json"
    assert json.loads(schemas["spec.schema.json"])["properties"]["judge"]
    components = yaml.safe_load(asyncapi_yaml())["components"]["schemas"]
    assert components["MigrationStart"]["properties"]["spec"]["$ref"] == "#/components/schemas/MigrationSpec"
    assert components["MigrationSpec"]["properties"]["student"]["$ref"] == "#/components/schemas/StudentSpec"
    assert "StudentSpec" in components
