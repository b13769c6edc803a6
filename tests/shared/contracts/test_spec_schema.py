"""The spec's published JSON Schema, as a non-Python client uses it: the committed files under docs/schemas/,
checked with the `jsonschema` package. Every spec field is described (docs/spec.md explains each one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from llamaduo.contracts.events import Envelope, MigrationStart, Subject
from llamaduo.contracts.spec import MigrationSpec, load_spec, spec_to_dict

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

ROOT = Path(__file__).resolve().parents[3]
SCHEMAS = ROOT / "docs" / "schemas"
DEMO_SPEC = ROOT / "shared" / "tasks" / "invoice_demo.yaml"
EXAMPLE_SPECS = sorted((ROOT / "examples").glob("*.yaml"))


def _load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def _registry() -> Any:
    """docs/schemas/spec.schema.json under its file name, the way a client that loaded the folder resolves it."""
    return referencing.Registry().with_resource(
        "spec.schema.json", referencing.Resource.from_contents(_load("spec.schema.json")))


def _start_validator() -> Any:
    """A validator of migration.start envelopes that follows the spec ``$ref``."""
    return jsonschema.Draft202012Validator(_load("migration.start.schema.json"), registry=_registry())


def _spec_validator() -> Any:
    return jsonschema.Draft202012Validator(_load("spec.schema.json"))


def _start_envelope(spec: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": "start-demo-1", "migration_id": "demo-1", "round": 0, "type": "migration.start",
            "schema_version": 1, "occurred_at": "2026-11-25T10:00:00Z", "correlation_id": "start-demo-1",
            "causation_id": None, "payload": {"spec": spec}}


def _undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                missing += _undescribed(candidate, f"{prefix}{name}.")
    return missing


def test_every_spec_field_has_a_description():
    missing = _undescribed(MigrationSpec)
    assert not missing, f"spec fields without description= in shared/contracts/spec.py: {missing}"


def test_the_spec_schema_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(_load("spec.schema.json"))
    jsonschema.Draft202012Validator.check_schema(_load("migration.start.schema.json"))


def test_start_schema_spec_property_resolves_to_the_spec_schema():
    start = _load("migration.start.schema.json")
    spec_property = start["$defs"]["MigrationStart"]["properties"]["spec"]
    assert spec_property["$ref"] == "spec.schema.json"
    resolved = _registry().resolver().lookup(spec_property["$ref"]).contents
    assert resolved == _load("spec.schema.json")
    assert resolved["additionalProperties"] is False
    assert set(resolved["required"]) >= {"task", "dataset", "student"}


@pytest.mark.parametrize("path", [DEMO_SPEC, *EXAMPLE_SPECS], ids=lambda p: p.name)
def test_real_specs_validate_against_the_schemas(path: Path):
    raw = yaml.safe_load(path.read_text())
    _spec_validator().validate(raw)
    _spec_validator().validate(spec_to_dict(load_spec(path)))  # every field written out, as the CLI may send it
    envelope = _start_envelope(raw)
    _start_validator().validate(envelope)
    # the bus accepts the very same message
    assert Envelope[MigrationStart].model_validate(envelope).type == Subject.MIGRATION_START


def test_a_misspelt_field_is_rejected():
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    misspelt = {**raw, "judge": {**raw["judge"], "treshold": 80}}
    errors = list(_start_validator().iter_errors(_start_envelope(misspelt)))
    assert errors, "a misspelt spec field passed the migration.start schema"
    assert any("treshold" in e.message and list(e.absolute_path) == ["payload", "spec", "judge"] for e in errors)
    assert not _spec_validator().is_valid({**raw, "studnet": raw["student"]})


def test_out_of_range_and_wrong_words_are_rejected():
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    validator = _spec_validator()
    assert not validator.is_valid({**raw, "judge": {**raw["judge"], "threshold": 150}})
    assert not validator.is_valid({**raw, "student": {**raw["student"], "method": "qlora"}})
    assert not validator.is_valid({k: v for k, v in raw.items() if k != "student"})
