"""What a migration leaves in the store for people: ``manifest.json`` (lineage) and ``report.json``."""

from __future__ import annotations

from typing import Any

from llamaduo.contracts.state import MigrationState
from llamaduo.storage.keys import batch_scores_prefix, migration_key
from llamaduo.storage.store import ArtifactStore

#: Why a round lists no predictions file although ``infer.done`` named one.
PREDICTIONS_NOT_WRITTEN = ("not written: judging closed early, before every shard was answered (the answered "
                           "shards stay under the round's predictions/ folder)")


def manifest(state: MigrationState, unwritten: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Lineage: which datasets trained which adapter, which predictions were judged by whom, with hashes.

    ``unwritten``: rounds whose joined predictions were never written (judging closed early, the remaining shards
    skipped): their ``predictions`` is None and ``predictions_note`` says why, instead of naming a missing object.

    ``best_round`` is the number of the round whose adapter the migration hands over (the best so far while
    it runs, None before a round is scored): :meth:`MigrationState.best_round`, the one rule for it, which the
    HTML report reads from here. Once the migration is over, ``merged_model`` is that round's merged model
    (``student.export_merged``).
    """
    best = state.best_round()
    return {
        "migration_id": state.migration_id,
        "stage": str(state.stage),
        "outcome": state.outcome,
        "spec": state.spec,
        "data": {name: ref for name, ref in state.data.model_dump(mode="json").items() if ref is not None}
        if state.data else None,  # the stored splits (holdout only when the migration has one)
        "rounds": [
            {
                "round": r.round,
                "trained_on": [d.model_dump(mode="json") for d in r.datasets],
                "adapter": r.adapter.model_dump(mode="json") if r.adapter else None,
                "predictions": r.predictions.model_dump(mode="json")
                if r.predictions and r.round not in unwritten else None,
                **({"predictions_note": PREDICTIONS_NOT_WRITTEN} if r.round in unwritten else {}),
                "judged_by": r.judge_provider or None,
                "scores": batch_scores_prefix(state.migration_id, r.round) if r.received_count else None,
                "summary": r.summary.model_dump(mode="json") if r.summary else None,
            }
            for r in state.rounds
        ],
        "best_round": best.round if best else None,
        "usage": state.usage.model_dump(mode="json"),
        "merged_model": best.merged.model_dump(mode="json") if state.done and best and best.merged else None,
    }


def write_manifest(store: ArtifactStore, state: MigrationState) -> None:
    """Write the manifest; once the migration is over, also the summary report. A round closed early whose
    predictions file is not in the store is listed without it (see :func:`manifest`)."""
    unwritten = frozenset(r.round for r in state.rounds if r.judging_closed and r.predictions is not None
                          and not store.exists(r.predictions.key))
    store.put_json(migration_key(state.migration_id, "manifest.json"), manifest(state, unwritten))
    if state.done:
        best = state.best_round()
        store.put_json(migration_key(state.migration_id, "report.json"), {
            "migration_id": state.migration_id,
            "outcome": state.outcome,
            "best_round": best.round if best else None,
            "model": best.adapter.model_dump(mode="json") if best and best.adapter else None,
            "merged_model": best.merged.model_dump(mode="json") if best and best.merged else None,
            "rounds": [r.summary.model_dump(mode="json") for r in state.rounds if r.summary],
            "usage": state.usage.model_dump(mode="json"),
        })
