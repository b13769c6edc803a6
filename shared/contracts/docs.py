"""The published contract, generated from the code: AsyncAPI (via FastStream), JSON Schemas and the spec reference.

``make docs`` (``python -m llamaduo.contracts.docs``) writes them under ``docs/``; tests check the committed copies
are current. The migration spec has its own JSON Schema (``docs/schemas/spec.schema.json``), which the
``migration.start`` schema and the AsyncAPI document reference for the start payload's ``spec`` (the payload
model types it as a mapping, validated by the controller; the schemas say which mapping).
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from llamaduo.contracts.events import PAYLOADS, Envelope, Subject
from llamaduo.settings import Settings

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: File name of the spec's JSON Schema under docs/schemas/ (referenced by the migration.start schema).
SPEC_SCHEMA_FILE = "spec.schema.json"
#: Payload fields typed as a free mapping whose content has its own schema: (model name, field) -> schema file.
EXTERNAL_FIELD_SCHEMAS = {("MigrationStart", "spec"): SPEC_SCHEMA_FILE}


def all_services_bus():  # type: ignore[no-untyped-def]
    """One (unconnected) bus with every service's handlers registered: the whole system's contract."""
    from llamaduo.bus.broker import Bus
    from llamaduo.runtime.service import SERVICES, registrar
    from llamaduo.storage.store import ArtifactStore

    settings = Settings()
    bus = Bus(settings, "contract")
    store = ArtifactStore(settings)
    for name in SERVICES:
        registrar(name)(bus, store)
    return bus


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a migration spec (the YAML file, or ``migration.start``'s ``payload.spec``).

    What a schema can say: field names (unknown ones refused), types, ranges, defaults and descriptions. The
    rules across fields (e.g. ``quantization`` needs ``method: lora``) are checked by ``llamaduo validate``.
    """
    from llamaduo.contracts.spec import MigrationSpec

    schema = MigrationSpec.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema, "title": "LlamaDuo migration spec"}


def _reference_external_schemas(schema: dict[str, Any], ref_for: dict[str, str]) -> dict[str, Any]:
    """``schema`` with each field of :data:`EXTERNAL_FIELD_SCHEMAS` replaced by ``{"$ref": ref_for[file]}``."""
    out = copy.deepcopy(schema)
    for (model_name, field_name), file_name in EXTERNAL_FIELD_SCHEMAS.items():
        for defs_key in ("$defs", "schemas"):
            model = out.get(defs_key, {}).get(model_name)
            if model and field_name in model.get("properties", {}):
                description = model["properties"][field_name].get("description")
                model["properties"][field_name] = {"$ref": ref_for[file_name], "description": description}
    return out


def _embedded_spec_components() -> dict[str, Any]:
    """The spec schema as AsyncAPI components: the spec as ``MigrationSpec``, its sections beside it."""
    spec = spec_json_schema()
    text = json.dumps({k: v for k, v in spec.items() if k != "$schema"}).replace('"#/$defs/', '"#/components/schemas/')
    spec = json.loads(text)
    components = spec.pop("$defs", {})
    components["MigrationSpec"] = spec
    return components


def asyncapi_yaml() -> str:
    """The AsyncAPI document of every subject, with the spec schema in its components."""
    import yaml
    from faststream.specification import AsyncAPI

    from llamaduo import __version__

    spec = AsyncAPI(all_services_bus().broker, title="LlamaDuo events", version=__version__,
                    description="Subjects, envelopes and payloads of a LlamaDuo installation "
                                "(JetStream; optional subject prefix).")
    doc = spec.to_specification().to_jsonable()
    schemas = doc["components"]["schemas"]
    embedded = _embedded_spec_components()
    # a spec section an event also carries (shadow.request's judge: a ProviderSpec) is one component when the
    # two schemas are the same; different ones under one name would be ambiguous
    clash = sorted(name for name in set(embedded) & set(schemas) if embedded[name] != schemas[name])
    if clash:
        raise RuntimeError(f"spec schema names {clash} clash with event schemas: rename the spec sections")
    schemas.update(embedded)
    doc["components"] = _reference_external_schemas(
        doc["components"], {SPEC_SCHEMA_FILE: "#/components/schemas/MigrationSpec"})
    # keys sorted: FastStream's own order depends on set iteration, and the committed file must be stable
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True)


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text: one per subject's envelope, and the spec's (``spec.schema.json``)."""
    out = {}
    for name in Subject:
        model = Envelope[PAYLOADS[name]]  # type: ignore[index]
        schema = _reference_external_schemas(model.model_json_schema(), {SPEC_SCHEMA_FILE: SPEC_SCHEMA_FILE})
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    out[SPEC_SCHEMA_FILE] = json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"
    return out


# ----------------------------------------------------------------------------------------- the spec reference

_PLAIN_TYPES: dict[Any, str] = {int: "integer", float: "number", str: "text", bool: "true or false",
                                Any: "anything"}


def readable_type(annotation: Any) -> str:
    """A field's type in user words: ``integer``, ``optional number``, ``one of: lora, full``, ``section``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        text = " or ".join(readable_type(a) for a in present)
        return f"optional {text}" if len(present) < len(args) else text
    if origin is Literal:
        return f'"{args[0]}"' if len(args) == 1 else "one of: " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {readable_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {readable_type(args[0])} to {readable_type(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return _PLAIN_TYPES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    """The field's range, e.g. ``0 to 100``, ``>= 1``, ``> 0 and < 1``."""
    found = {kind: getattr(meta, kind) for meta in field.metadata for kind in ("ge", "gt", "le", "lt", "min_length")
             if getattr(meta, kind, None) is not None}
    if "ge" in found and "le" in found:
        return f"{found['ge']} to {found['le']}"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{words[k]} {v}" for k, v in found.items() if k in words]
    if found.get("min_length"):
        parts.append("not empty")
    return " and ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    if value == "":
        return "`\"\"` (empty)"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def spec_markdown() -> str:
    """Every field of the migration spec, one table per section, with type, range, default and meaning."""
    from llamaduo.contracts.spec import MigrationSpec

    header = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines = ["# Migration spec reference", "",
             "Generated from `shared/contracts/spec.py` (`make docs`). A spec is one YAML file; unknown fields are "
             "refused, naming the field. `llamaduo validate spec.yaml` checks one before anything starts. The same "
             "rules as a JSON Schema: [`docs/schemas/spec.schema.json`](schemas/spec.schema.json) (editors with a "
             "YAML language server complete and check a spec whose first line is "
             "`# yaml-language-server: $schema=<path to docs/schemas/spec.schema.json>`).", "",
             "Types: *text*, *integer*, *number* (decimals allowed), *true or false*, *one of: ...* (exactly one of "
             "the words listed), *optional ...* (may be left out or `null`), *section* (a nested mapping, described "
             "in its own table).", ""]
    written: dict[type[BaseModel], str] = {}
    pending: list[tuple[str, type[BaseModel], str]] = [("", MigrationSpec, "")]
    while pending:
        path, model, description = pending.pop(0)
        written[model] = path
        lines += [f"## {f'`{path}`' if path else 'Top level'}", ""]
        if description:
            lines += [_cell(description), ""]
        lines += header
        children: list[tuple[str, type[BaseModel], str]] = []
        for name, field in model.model_fields.items():
            full = f"{path}.{name}" if path else name
            nested = _nested_model(field.annotation)
            type_text = readable_type(field.annotation)
            meaning = field.description or ""
            if nested is not None and nested in written:
                type_text += f", the fields of `{written[nested]}`"
                default = "`null`" if not field.is_required() and field.get_default() is None else _default(field)
            elif nested is not None:
                children.append((full, nested, meaning))
                written[nested] = full
                default = "(see below)" if not field.is_required() else "required"
            else:
                default = _default(field)
            if bounds := _bounds(field):
                type_text += f", {bounds}"
            lines.append(f"| `{full}` | {_cell(type_text)} | {_cell(default)} | {_cell(meaning)} |")
        lines.append("")
        pending = children + pending  # a section's own sections follow it
    return "\n".join(lines)


def write_docs(docs_dir: Path) -> list[Path]:
    """Write the AsyncAPI document, the spec reference and every JSON Schema under ``docs_dir``."""
    written = [docs_dir / "asyncapi.yaml", docs_dir / "spec.md"]
    written[0].write_text(asyncapi_yaml())
    written[1].write_text(spec_markdown())
    schema_dir = docs_dir / "schemas"
    schema_dir.mkdir(parents=True, exist_ok=True)
    for name, text in json_schemas().items():
        (schema_dir / name).write_text(text)
        written.append(schema_dir / name)
    return written


if __name__ == "__main__":
    for p in write_docs(Path(__file__).resolve().parents[2] / "docs"):
        print(p)
