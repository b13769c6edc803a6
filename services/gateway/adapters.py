"""Adapter hand-off: a promoted version's adapter reaches the local server without a restart.

When a route's state names a version with an ``adapter_key`` and its ``local.load_adapters`` is on, the
:class:`AdapterLoader` makes sure the local server serves the version's ``local_model``:

1. ``GET <base_url>/models``: already served (loaded at startup, by another replica, or before a rollback):
   nothing to do;
2. else the adapter folder is downloaded from S3 through the one
   :class:`~llamaduo.storage.store.ArtifactStore` (:meth:`~llamaduo.storage.store.ArtifactStore.get_dir`: the key
   must lie under its migration's prefix and every file must match the sha256 its folder index records; with the
   state's ``adapter_sha256``, :meth:`~llamaduo.storage.store.ArtifactStore.get_ref_dir`: the index itself must
   have that hash, so an adapter replaced in S3 after its promotion is never loaded) into a temporary folder
   inside ``local.adapters_dir``, then renamed to ``<adapters_dir>/<version>``;
3. ``POST <base_url>/load_lora_adapter`` ``{"lora_name": local_model, "lora_path": "<adapters_dir>/<version>"}``
   (vLLM's endpoint, also served by ``llamaduo serve --adapters-dir``), with the local server's admin key (else
   its API key). A refusal because the name is already loaded (another replica won the race) counts as loaded.

Until the load succeeded, :meth:`AdapterLoader.require` refuses the local side for that route with the fallback
reason ``unavailable``, so requests for that version are answered upstream. A failed hand-off is logged and
retried after ``retry_seconds`` or on the route's next change. Nothing is unloaded: after a rollback the
previous version's name is still served.

A local server that restarted has lost the adapters loaded at run time. When it answers a request for a name
this loader had loaded with HTTP 404 / model-not-found, the gateway calls :meth:`AdapterLoader.lost`: the name is
forgotten and handed off again (at most once per ``retry_seconds`` per route), counted in
:attr:`AdapterLoader.reloads`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2

from llamaduo.contracts.events import ArtifactRef
from llamaduo.contracts.routes import RouteState
from llamaduo.services.gateway.config import LocalConfig, RouteConfig
from llamaduo.services.gateway.sides import LocalFailure

log = logging.getLogger("llamaduo.gateway.adapters")

#: A version becomes a folder name: letters, digits, '.', '_', '-' (no '..', no separators).
_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class HandOffError(Exception):
    """One hand-off attempt failed; the message is short and holds no secret."""


def adapter_migration(key: str) -> str:
    """The migration whose prefix holds ``key`` (``migrations/<id>/...``); :class:`HandOffError` otherwise."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "migrations":
        raise HandOffError(f"adapter key {key!r} is not under migrations/<id>/")
    return parts[1]


def version_folder(adapters_dir: str | Path, version: str) -> Path:
    """``<adapters_dir>/<version>``; :class:`HandOffError` for a version that cannot be a folder name."""
    if not _FOLDER_RE.fullmatch(version) or ".." in version:
        raise HandOffError(f"version {version!r} cannot name a folder (letters, digits, '.', '_', '-')")
    return Path(adapters_dir).expanduser() / version


def _target(state: RouteState) -> tuple[str | None, str | None, str | None, str | None]:
    """What a hand-off loads: (version, local model name, adapter key, sha256 of its index)."""
    return state.version, state.local_model, state.adapter_key, state.adapter_sha256


class AdapterLoader:
    """Loads promoted adapters onto the local servers of the routes that ask for it (``local.load_adapters``).

    :meth:`on_change` is the route table's listener; :meth:`require` is asked before a local answer.
    ``store`` is the :class:`~llamaduo.storage.store.ArtifactStore` (None: adapters can only be found already
    served). Hand-offs run as background tasks of the running loop; :meth:`aclose` ends them.
    """

    def __init__(self, routes: Mapping[str, RouteConfig], store: Any | None, *, retry_seconds: float = 30.0) -> None:
        self.locals: dict[str, LocalConfig] = {
            name: r.local for name, r in routes.items() if r.local is not None and r.local.load_adapters}
        self.store = store
        self.retry_seconds = retry_seconds
        #: route -> the state whose adapter is wanted now (routes that need no hand-off are absent)
        self.wanted: dict[str, RouteState] = {}
        #: route -> local model names known to be served by its local server
        self.served: dict[str, set[str]] = {name: set() for name in self.locals}
        self.loads = 0
        #: names forgotten because the local server no longer served them (it restarted), see :meth:`lost`
        self.reloads = 0
        self._lost_at: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._clients: dict[str, httpx2.AsyncClient] = {}

    def needs_hand_off(self, route: str, state: RouteState | None) -> bool:
        return (route in self.locals and state is not None and state.mode != "off" and state.version is not None
                and bool(state.adapter_key))

    # ------------------------------------------------------------------ what the request path asks

    def ready(self, route: str) -> bool:
        """Whether the local side of ``route`` may be asked: no hand-off pending for its current version."""
        state = self.wanted.get(route)
        return state is None or (state.local_model or state.version) in self.served.get(route, set())

    def require(self, route: str) -> None:
        """Raise :class:`LocalFailure` ``unavailable`` while the current version's adapter is not loaded yet."""
        if not self.ready(route):
            state = self.wanted[route]
            raise LocalFailure("unavailable", f"the adapter of version {state.version} is not loaded on the local "
                               "server yet")

    # ------------------------------------------------------------------ route changes

    def on_change(self, route: str, state: RouteState | None) -> None:
        """The route table's listener: start (or restart) the hand-off of ``state``'s adapter when needed."""
        if not self.needs_hand_off(route, state):
            self.wanted.pop(route, None)
            self._cancel(route)
            return
        assert state is not None
        before = self.wanted.get(route)
        self.wanted[route] = state
        running = self._tasks.get(route)
        if running is not None and not running.done() and before is not None and _target(before) == _target(state):
            return  # the same adapter is on its way (e.g. canary -> full of one version)
        self._cancel(route)
        if self.ready(route):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # applied outside a loop (tests of the table): :meth:`start` picks it up
            return
        self._tasks[route] = loop.create_task(self._hand_off_until_done(route, state),
                                              name=f"llamaduo-adapter-{route}")

    def lost(self, route: str, name: str) -> None:
        """The local server of ``route`` answered ``name`` with 404 / model-not-found (it restarted and lost its
        run-time adapters): forget ``name`` and hand the current version off again. At most once per
        ``retry_seconds`` per route, so a server that keeps refusing costs one hand-off per interval."""
        if name not in self.served.get(route, set()):
            return  # never loaded by this loader: nothing it can restore
        now = time.monotonic()
        if now - self._lost_at.get(route, float("-inf")) < self.retry_seconds:
            return
        self._lost_at[route] = now
        self.served[route].discard(name)
        self.reloads += 1
        log.warning("the local server no longer serves a loaded adapter (restarted?); loading it again",
                    extra={"route": route, "local_model": name})
        state = self.wanted.get(route)
        if state is not None and (state.local_model or state.version) == name:
            self.on_change(route, state)

    async def start(self) -> None:
        """Start the hand-offs of states applied before the loop ran."""
        for route, state in list(self.wanted.items()):
            if route not in self._tasks:
                self.on_change(route, state)

    def _cancel(self, route: str) -> None:
        task = self._tasks.pop(route, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _hand_off_until_done(self, route: str, state: RouteState) -> None:
        while (wanted := self.wanted.get(route)) is not None and _target(wanted) == _target(state):
            try:
                await self.hand_off(route, state)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                detail = str(err) if isinstance(err, HandOffError) else f"{type(err).__name__}: {str(err)[:200]}"
                log.warning("adapter not loaded; retrying later", extra={
                    "route": route, "version": state.version, "local_model": state.local_model,
                    "error": detail[:300], "retry_seconds": self.retry_seconds})
                await asyncio.sleep(self.retry_seconds)

    # ------------------------------------------------------------------ one hand-off

    def _client(self, route: str) -> httpx2.AsyncClient:
        if route not in self._clients:
            local = self.locals[route]
            env = local.admin_api_key_env or local.api_key_env
            key = os.environ.get(env) if env else None
            self._clients[route] = httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=httpx2.Timeout(max(local.timeout_seconds, 60.0)))
        return self._clients[route]

    async def served_models(self, route: str) -> set[str]:
        """The model names the local server of ``route`` lists in ``/models``."""
        local = self.locals[route]
        reply = await self._client(route).get(local.base_url.rstrip("/") + "/models")
        if reply.status_code != 200:
            raise HandOffError(f"GET /models of the local server answered HTTP {reply.status_code}")
        return {str(m.get("id")) for m in reply.json().get("data", []) if isinstance(m, dict)}

    async def hand_off(self, route: str, state: RouteState) -> None:
        """Make the local server of ``route`` serve ``state``'s adapter (download and load unless served)."""
        assert state.version is not None and state.adapter_key
        name = state.local_model or state.version
        local = self.locals[route]
        if name in await self.served_models(route):
            self.served[route].add(name)
            log.info("adapter already served", extra={"route": route, "local_model": name})
            return
        assert local.adapters_dir is not None
        folder = version_folder(local.adapters_dir, state.version)
        await asyncio.to_thread(self.download, state.adapter_key, folder, state.adapter_sha256)
        reply = await self._client(route).post(local.base_url.rstrip("/") + "/load_lora_adapter",
                                               json={"lora_name": name, "lora_path": str(folder)})
        if reply.status_code != 200:
            if name in await self.served_models(route):  # loaded meanwhile (another replica): harmless
                self.served[route].add(name)
                return
            raise HandOffError(f"POST /load_lora_adapter answered HTTP {reply.status_code}: {reply.text[:200]}")
        self.served[route].add(name)
        self.loads += 1
        log.info("adapter loaded on the local server", extra={"route": route, "version": state.version,
                                                              "local_model": name, "folder": str(folder)})

    def download(self, key: str, folder: Path, sha256: str | None = None) -> Path:
        """The adapter folder at ``key`` in ``folder``, verified file by file, and its index against ``sha256``
        when given (blocking: a worker thread)."""
        if self.store is None:
            raise HandOffError("no artifact store to download the adapter from")
        migration_id = adapter_migration(key)
        store = self.store

        def fetch(into: Path) -> Path:
            if sha256:
                return store.get_ref_dir(migration_id, ArtifactRef(key=key, sha256=sha256), into)
            return store.get_dir(key, into, migration_id=migration_id)

        if folder.is_dir():  # already here (another replica, or an earlier try): verified, missing files fetched
            return fetch(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{uuid.uuid4().hex[:6]}.", dir=folder.parent))
        try:
            fetch(partial)
            try:
                partial.rename(folder)
            except OSError:  # another replica renamed its copy first: check that one instead
                return fetch(folder)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
        return folder

    async def aclose(self) -> None:
        """End the hand-offs in progress and close the clients."""
        for route in list(self._tasks):
            task = self._tasks.pop(route)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
