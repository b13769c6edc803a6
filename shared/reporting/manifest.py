"""What a migration leaves in the store for people: ``manifest.json`` (lineage) and ``report.json``."""

from __future__ import annotations

from typing import Any

from llamaduo.storage.keys import migration_key
from llamaduo.storage.store import ArtifactStore


def _best(state: Any) -> Any:
    """The chosen round once the migration is over, else None."""
    return state.best_round() if state.done else None


def manifest(state: Any) -> dict[str, Any]:
    """Lineage: which datasets trained which adapter, which predictions were judged by whom, with hashes.

    Once the migration is over, ``merged_model`` is the chosen round's merged model (``student.export_merged``).
    """
    best = _best(state)
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
        "merged_model": best.merged.model_dump(mode="json") if best and best.merged else None,
    }


def write_manifest(store: ArtifactStore, state: Any) -> None:
    """Write the manifest; once the migration is over, also the summary report."""
    best = _best(state)
    store.put_json(migration_key(state.migration_id, "manifest.json"), manifest(state))
    if state.done:
        store.put_json(migration_key(state.migration_id, "report.json"), {
            "migration_id": state.migration_id,
            "outcome": state.outcome,
            "best_round": best.round if best else None,
            "model": best.adapter.model_dump(mode="json") if best and best.adapter else None,
            "merged_model": best.merged.model_dump(mode="json") if best and best.merged else None,
            "rounds": [r.summary.model_dump(mode="json") for r in state.rounds if r.summary],
            "usage": state.usage.model_dump(mode="json"),
        })
