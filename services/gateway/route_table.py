"""The routes' current states, kept by a watch on the ``<stream>_ROUTES`` KV bucket.

``llamaduo promote`` / ``llamaduo rollback`` write an entry by compare-and-set; every gateway replica watching
the bucket sees it within a moment, so a promotion applies without a restart. A route with no entry is ``off``
(the upstream answers). An entry that does not parse is logged and ignored (the route keeps its last good state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from llamaduo.contracts.routes import RouteState

log = logging.getLogger("llamaduo.gateway.routes")


class RouteTable:
    """Route name -> :class:`RouteState`, current as long as :meth:`watch` runs."""

    def __init__(self) -> None:
        self.states: dict[str, RouteState] = {}
        self.changes = 0
        #: called with (route, its new state or None) after each applied change (e.g. the adapter hand-off)
        self.listeners: list[Callable[[str, RouteState | None], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    def get(self, route: str) -> RouteState | None:
        return self.states.get(route)

    def apply(self, key: str, value: bytes | None, operation: str | None = None) -> None:
        """Apply one KV entry (a put, or a delete/purge when ``operation`` says so or ``value`` is empty)."""
        if operation in ("DEL", "PURGE") or not value:
            self.states.pop(key, None)
        else:
            try:
                self.states[key] = RouteState.from_bytes(value)
            except ValueError as err:
                log.warning("route state not understood; keeping the last one",
                            extra={"route": key, "error": str(err)[:300]})
                return
        self.changes += 1
        state = self.states.get(key)
        log.info("route state", extra={"route": key, "mode": state.mode if state else "off",
                                        "version": state.version if state else None,
                                        "percent": state.percent if state else 0})
        for listener in self.listeners:
            try:
                listener(key, state)
            except Exception:  # a listener's failure never stops the table following the bucket
                log.warning("route change listener failed", exc_info=True, extra={"route": key})

    def _apply_entry(self, entry: Any) -> None:
        self.apply(entry.key, entry.value, entry.operation)

    async def watch(self, kv: Any) -> None:
        """Read every route's state, then keep following the bucket in the background (:meth:`stop` ends it)."""
        watcher = await kv.watchall()
        while (entry := await watcher.updates(timeout=10.0)) is not None:  # None: the initial values are in
            self._apply_entry(entry)
        self._watcher = watcher
        self._task = asyncio.ensure_future(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is not None:
                    self._apply_entry(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("watch of route states ended", exc_info=True)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = self._watcher = None
