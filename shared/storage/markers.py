"""Markers the controller leaves in the artifact store for the workers: a round whose judging it closed early
(sequential early stopping) has ``round-N/judging-closed``; its remaining eval batches are neither answered nor
judged."""

from __future__ import annotations

from llamaduo.storage.keys import judging_closed_key
from llamaduo.storage.store import ArtifactStore


class ClosedRounds:
    """Which rounds' judging is closed, asked of the store until seen closed (a closed round stays closed)."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._closed: set[tuple[str, int]] = set()

    def closed(self, migration_id: str, round: int) -> bool:
        """Whether the controller closed judging of ``round`` (blocking: one store request until it is)."""
        if (migration_id, round) not in self._closed:
            if not self._store.exists(judging_closed_key(migration_id, round)):
                return False
            self._closed.add((migration_id, round))
        return True
