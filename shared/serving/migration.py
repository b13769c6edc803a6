"""A finished migration's model for serving: :func:`fetch_migration_model` gets it, :func:`migration_defaults`
gives its request defaults. Both ``llamaduo serve --migration`` and the inference service (once a migration
completes with ``serve.enabled``) use them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llamaduo.contracts.spec import MigrationSpec
from llamaduo.serving.engine import ModelDefaults

if TYPE_CHECKING:
    from llamaduo.storage.store import ArtifactStore


def fetch_migration_model(
    store: ArtifactStore, migration_id: str, cache: Path, *, model_key: str | None = None
) -> tuple[Path, MigrationSpec]:
    """Download a finished migration's chosen model into ``cache/<migration_id>``; returns it with the spec.

    The chosen model is ``model_key`` when given (the ``migration.completed`` event's ``model``), else the one
    its ``report.json`` names. Raises ``LookupError`` when the migration names no model.
    """
    from llamaduo.storage.keys import migration_key, spec_key

    if not model_key:
        report = store.get_json(migration_key(migration_id, "report.json"))
        if not report.get("model"):
            raise LookupError(f"report of {migration_id} names no model (outcome {report.get('outcome')})")
        model_key = str(report["model"]["key"])
    spec = MigrationSpec.model_validate(store.get_json(spec_key(migration_id)))
    return store.get_dir(model_key, Path(cache) / migration_id), spec


def migration_defaults(spec: MigrationSpec) -> ModelDefaults:
    """A migration's request defaults: its student's inference settings and its task's system prompt."""
    return ModelDefaults(inference=spec.student.inference, system_prompt=spec.task.system_prompt)
