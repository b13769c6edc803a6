"""What a migration leaves in the store for people: ``manifest.json`` (lineage) and ``report.json``."""

from __future__ import annotations

import hashlib
from typing import Any

from llamaduo.contracts import ArtifactRef
from llamaduo.store import ArtifactStore, migration_key, round_key


def merged_key(migration_id: str, round: int) -> str:
    """S3 folder of a round's LoRA adapter merged into its base model (``student.export_merged``)."""
    return round_key(migration_id, round, "merged")


def merged_ref(store: ArtifactStore, migration_id: str, round: int) -> ArtifactRef | None:
    """The stored merged model of a round (hash of its index, as ``put_dir`` gives), or None when there is none."""
    index = f"{merged_key(migration_id, round)}/_index.json"
    if not store.exists(index):
        return None
    return ArtifactRef(key=merged_key(migration_id, round), sha256=hashlib.sha256(store.get_bytes(index)).hexdigest())


def manifest(state: Any, merged_model: ArtifactRef | None = None) -> dict[str, Any]:
    """Lineage: which datasets trained which adapter, which predictions were judged by whom, with hashes.

    ``merged_model``: the chosen round's merged model, listed once the migration is over (when there is one).
    """
    return {
        "migration_id": state.migration_id,
        "stage": str(state.stage),
        "outcome": state.outcome,
        "spec": state.spec,
        "data": state.data.model_dump(mode="json") if state.data else None,
        "rounds": [
            {
                "round": r.round,
                "trained_on": [d.model_dump(mode="json") for d in r.datasets],
                "adapter": r.adapter.model_dump(mode="json") if r.adapter else None,
                "predictions": r.predictions.model_dump(mode="json") if r.predictions else None,
                "judged_by": r.judge_provider or None,
                "summary": r.summary.model_dump(mode="json") if r.summary else None,
            }
            for r in state.rounds
        ],
        "usage": state.usage.model_dump(mode="json"),
        "merged_model": merged_model.model_dump(mode="json") if merged_model else None,
    }


def write_manifest(store: ArtifactStore, state: Any) -> None:
    """Write the manifest; once the migration is over, also the summary report."""
    best = state.best_round() if state.done else None
    merged = merged_ref(store, state.migration_id, best.round) if best and best.adapter else None
    store.put_json(migration_key(state.migration_id, "manifest.json"), manifest(state, merged))
    if state.done:
        store.put_json(migration_key(state.migration_id, "report.json"), {
            "migration_id": state.migration_id,
            "outcome": state.outcome,
            "best_round": best.round if best else None,
            "model": best.adapter.model_dump(mode="json") if best and best.adapter else None,
            "merged_model": merged.model_dump(mode="json") if merged else None,
            "rounds": [r.summary.model_dump(mode="json") for r in state.rounds if r.summary],
            "usage": state.usage.model_dump(mode="json"),
        })
