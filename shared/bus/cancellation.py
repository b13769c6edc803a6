"""Cancelled migrations, known to every service without a round trip per message.

``llamaduo cancel ID`` publishes ``migration.cancel``; the controller ends the migration and writes its id to the
KV bucket :func:`~llamaduo.bus.topology.cancelled_bucket` *before* it publishes the terminal event. Every
service's :class:`~llamaduo.bus.broker.Bus` watches that bucket into an in-memory set
(:class:`CancelledMigrations`), so that

* the bus middleware acks and skips any message of a cancelled migration (one place for every service),
* long work (training steps, inference shards, teacher calls) checks :meth:`CancelledMigrations.checker` at
  its safe points and stops with :class:`MigrationCancelled`, which the middleware acks (no retry, no dead
  letter),
* :meth:`~llamaduo.bus.broker.Bus.emit` drops the non-terminal events of a cancelled migration, so nothing of
  it is published after its terminal event.

No FastStream import here: domain code raises :class:`MigrationCancelled` without pulling in the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("llamaduo.bus.cancellation")

#: After a failed attempt to watch the bucket, wait this long before the next message tries again.
RETRY_WATCH_S = 5.0


class MigrationCancelled(Exception):
    """Raised by work that stopped because its migration was cancelled: the message is acked and dropped."""


def migration_of(body: bytes | str) -> str | None:
    """The ``migration_id`` of a message body (an envelope or a dead letter), or None when it has none."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return None
    value = data.get("migration_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class CancelledMigrations:
    """The ids of cancelled migrations, kept current by a watch on the cancelled-migrations KV bucket.

    ``open_bucket`` returns the bucket (a nats-py ``KeyValue``), creating it when missing. :meth:`start` is
    called by the bus middleware before every message; its first call loads the ids cancelled so far and
    keeps watching for new ones. Membership tests are plain set lookups, safe from worker threads.
    """

    def __init__(self, open_bucket: Callable[[], Awaitable[Any]], service: str = "") -> None:
        self._open_bucket = open_bucket
        self._service = service
        self.ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None
        self._lock: asyncio.Lock | None = None
        self._retry_at = 0.0

    def __contains__(self, migration_id: object) -> bool:
        return migration_id in self.ids

    def checker(self, migration_id: str) -> Callable[[], bool]:
        """A no-argument check for long work: True once ``migration_id`` is cancelled."""
        return lambda: migration_id in self.ids

    def covers(self, body: bytes | str) -> bool:
        """True when the message ``body`` belongs to a cancelled migration (cheap while none is cancelled)."""
        return bool(self.ids) and migration_of(body) in self.ids

    async def start(self) -> None:
        """Start watching the bucket, once; return when the ids cancelled so far are known.

        A bucket that cannot be watched (NATS busy) is logged and tried again by a later message; meanwhile
        messages are handled as usual (the controller ignores events of a finished migration anyway)."""
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._task is not None and not self._task.done():
                return
            try:
                kv = await self._open_bucket()
                watcher = await kv.watchall()
                while (entry := await watcher.updates(timeout=10.0)) is not None:  # None: the snapshot is in
                    self._apply(entry)
            except Exception as err:  # any NATS failure: retry later, never fail the message for it
                self._retry_at = loop.time() + RETRY_WATCH_S
                log.warning("cancelled migrations not watched; retrying later",
                            extra={"service": self._service, "error": f"{type(err).__name__}: {err}"})
                return
            self._watcher = watcher
            self._task = asyncio.ensure_future(self._follow(watcher))
            log.debug("watching cancelled migrations", extra={"service": self._service, "cancelled": len(self.ids)})

    async def _follow(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is not None:
                    self._apply(entry)
        except Exception:  # the connection went away: the next message starts a new watch
            log.warning("watch of cancelled migrations ended", exc_info=True, extra={"service": self._service})

    def _apply(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE"):
            self.ids.discard(entry.key)
            return
        if entry.key not in self.ids:
            self.ids.add(entry.key)
            log.info("migration cancelled", extra={"service": self._service, "migration_id": entry.key})

    async def mark(self, migration_id: str, info: dict[str, Any]) -> None:
        """Record ``migration_id`` as cancelled (the controller does, before the terminal event is out)."""
        kv = await self._open_bucket()
        await kv.put(migration_id, json.dumps(info).encode())
        self.ids.add(migration_id)

    async def stop(self) -> None:
        """Stop watching (the broker's connection is closing)."""
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:  # already gone with its connection
                log.debug("watcher already stopped", extra={"service": self._service})
        if self._task is not None:
            self._task.cancel()
        self._task = self._watcher = None
