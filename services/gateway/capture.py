"""Captured traffic: per-route JSONL batches in S3, written when full or old enough, and on shutdown.

Each row is one answered request after redaction: ``request_id``, ``at``, ``messages``, ``response``,
``answered_by``, ``local_version``. Never headers, keys or client addresses: the gateway hands this module
only those fields. A batch's key is fixed when its first row arrives
(``traffic/<route>/<YYYY-MM-DD>/<HHMMSS>-<batch-id>.jsonl``), so the ``traffic.logged`` event of a row can name
the object it will be in. A write that fails is retried at the next flush (rows are kept, never lost silently).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llamaduo.storage.keys import traffic_key
from llamaduo.storage.store import ArtifactStore

log = logging.getLogger("llamaduo.gateway.capture")


@dataclass
class _Batch:
    key: str
    opened: float
    rows: list[dict[str, Any]] = field(default_factory=list)


class TrafficCapture:
    """Batches of captured rows per route, written to S3 through the installation's :class:`ArtifactStore`.

    :meth:`add` returns the key the row goes to; :meth:`flush_due` writes batches older than
    ``batch_seconds``; :meth:`flush` writes every open batch (shutdown). A batch reaching ``batch_rows`` is
    written at once (in a worker thread). ``written`` counts rows stored so far.
    """

    def __init__(self, store: ArtifactStore, *, batch_rows: int = 200, batch_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.clock = clock
        self.written = 0
        self._open: dict[str, _Batch] = {}
        self._pending: list[_Batch] = []  # full or failed batches waiting for a write
        self._lock = asyncio.Lock()

    def add(self, route: str, row: dict[str, Any]) -> str:
        """Queue ``row`` for ``route``; return the S3 key of the batch it will be written in."""
        batch = self._open.get(route)
        if batch is None:
            batch = self._open[route] = _Batch(traffic_key(route, datetime.now(UTC), uuid.uuid4().hex[:12]),
                                               self.clock())
        batch.rows.append(row)
        if len(batch.rows) >= self.batch_rows:
            self._pending.append(self._open.pop(route))
        return batch.key

    @property
    def buffered(self) -> int:
        """Rows not written yet."""
        return sum(len(b.rows) for b in (*self._open.values(), *self._pending))

    async def flush_due(self) -> int:
        """Write full batches and those open longer than ``batch_seconds``; the rows written."""
        now = self.clock()
        for route in [r for r, b in self._open.items() if now - b.opened >= self.batch_seconds]:
            self._pending.append(self._open.pop(route))
        return await self._write_pending()

    async def flush(self) -> int:
        """Write every batch, open or not (shutdown); the rows written."""
        self._pending.extend(self._open.values())
        self._open.clear()
        return await self._write_pending()

    async def _write_pending(self) -> int:
        async with self._lock:
            batches, self._pending = self._pending, []
            done = 0
            for i, batch in enumerate(batches):
                try:
                    await asyncio.to_thread(self.store.put_jsonl, batch.key, batch.rows)
                except Exception as err:  # keep the rows: the next flush tries again
                    log.warning("traffic batch not written; retrying at the next flush",
                                extra={"key": batch.key, "rows": len(batch.rows), "error": type(err).__name__})
                    self._pending.extend(batches[i:])
                    break
                done += len(batch.rows)
            self.written += done
            return done

    async def run(self, interval: float = 1.0) -> None:
        """Flush due batches every ``interval`` seconds until cancelled (then write everything)."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush_due()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())
