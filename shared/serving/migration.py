"""A finished migration's model for serving: :func:`fetch_migration_model` gets it, :func:`migration_defaults`
gives its request defaults. Both ``llamaduo serve --migration`` and the inference service (once a migration
completes with ``serve.enabled``) use them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llamaduo.contracts.spec import MigrationSpec
from llamaduo.errors import StoreError
from llamaduo.serving.engine import ModelDefaults

if TYPE_CHECKING:
    from llamaduo.storage.store import ArtifactStore


def fetch_migration_model(
    store: ArtifactStore, migration_id: str, cache: Path, *, model_key: str | None = None,
    model_sha256: str | None = None,
) -> tuple[Path, MigrationSpec]:
    """Download a finished migration's chosen model into ``cache/<migration_id>``; returns it with the spec.

    The chosen model is ``model_key`` when given (the ``migration.completed`` event's ``model``), else the one
    its ``report.json`` names. Raises ``LookupError`` when the migration names no model.

    The served model must be the one judged: the folder must lie under the migration's prefix and its index
    must have the sha256 it was published with (``model_sha256``, the event's; else the one ``report.json`` or
    ``manifest.json`` records for that key), and every file its index hash; :class:`StoreError` otherwise,
    before anything is loaded.
    """
    from llamaduo.storage.keys import migration_key, require_own_key, spec_key

    if not model_key:
        report = store.get_json(migration_key(migration_id, "report.json"))
        if not report.get("model"):
            raise LookupError(f"report of {migration_id} names no model (outcome {report.get('outcome')})")
        model_key = str(report["model"]["key"])
        model_sha256 = model_sha256 or report["model"].get("sha256")
    require_own_key(migration_id, model_key)
    digest = model_sha256 or _recorded_sha256(store, migration_id, model_key)
    if not digest:
        raise StoreError(f"model {model_key} of migration {migration_id}: no sha256 recorded for it (event, "
                         "report.json or manifest.json), so it cannot be verified as the model that was judged")
    spec = MigrationSpec.model_validate(store.get_json(spec_key(migration_id)))
    folder = store.get_dir(model_key, Path(cache) / migration_id, migration_id=migration_id, sha256=digest)
    return folder, spec


def _recorded_sha256(store: ArtifactStore, migration_id: str, key: str) -> str | None:
    """The sha256 the migration's report or manifest records for the folder ``key`` (None when neither does)."""
    from llamaduo.storage.keys import migration_key

    for name in ("report.json", "manifest.json"):
        object_key = migration_key(migration_id, name)
        if not store.exists(object_key):
            continue
        doc = store.get_json(object_key)
        refs = [doc.get("model"), doc.get("merged_model"), *(r.get("adapter") for r in doc.get("rounds") or []
                                                            if isinstance(r, dict))]
        for ref in refs:
            if isinstance(ref, dict) and ref.get("key") == key and ref.get("sha256"):
                return str(ref["sha256"])
    return None


def migration_defaults(spec: MigrationSpec) -> ModelDefaults:
    """A migration's request defaults: its student's inference settings and its task's system prompt."""
    return ModelDefaults(inference=spec.student.inference, system_prompt=spec.task.system_prompt)
