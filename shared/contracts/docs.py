"""The published contract, generated from the code: AsyncAPI (via FastStream) and JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path

from llamaduo.contracts.events import PAYLOADS, Envelope, Subject
from llamaduo.settings import Settings


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


def asyncapi_yaml() -> str:
    import yaml
    from faststream.specification import AsyncAPI

    from llamaduo import __version__

    spec = AsyncAPI(all_services_bus().broker, title="LlamaDuo events", version=__version__,
                    description="Subjects, envelopes and payloads of a LlamaDuo installation "
                                "(JetStream; optional subject prefix).")
    # keys sorted: FastStream's own order depends on set iteration, and the committed file must be stable
    return yaml.safe_dump(spec.to_specification().to_jsonable(), sort_keys=True, allow_unicode=True)


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text, one per subject's envelope."""
    out = {}
    for name in Subject:
        model = Envelope[PAYLOADS[name]]  # type: ignore[index]
        out[f"{name}.schema.json"] = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
    return out


def spec_markdown() -> str:
    """Every field of the migration spec, with type, default and help, from the pydantic models."""
    from pydantic import BaseModel

    from llamaduo.contracts.spec import MigrationSpec

    lines = ["# Migration spec reference", "",
             "Generated from `shared/contracts/spec.py` (`make docs`). Unknown fields are refused, naming the field.",
             "",
             "| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if nested is None:
                for arg in getattr(ann, "__args__", ()):
                    if isinstance(arg, type) and issubclass(arg, BaseModel):
                        nested = arg
            if nested:
                type_name = nested.__name__
            elif isinstance(ann, type):
                type_name = ann.__name__
            else:
                type_name = str(ann).replace("typing.", "").replace("|", "\\|")
            default = "required" if field.is_required() else (
                "(see below)" if nested else repr(field.get_default(call_default_factory=True)))
            lines.append(f"| `{prefix}{name}` | {type_name} | {default} | {field.description or ''} |")
            if nested:
                walk(nested, f"{prefix}{name}.")

    walk(MigrationSpec, "")
    return "\n".join(lines) + "\n"


def write_docs(docs_dir: Path) -> list[Path]:
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
