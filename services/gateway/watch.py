"""The shadow watch: a rolling window of judge scores per route and version, and what happens when it degrades.

The judge answers every ``shadow.request`` with a ``shadow.scored`` (:mod:`llamaduo.services.judge.shadow`). The
gateway service consumes those through one durable consumer shared by its replicas (a work queue: each score is
counted once) and keeps, per route and version, the last ``shadow.window`` similarity scores in the KV bucket
``<stream>_SHADOW`` (:func:`llamaduo.bus.topology.shadow_bucket`), changed only by compare-and-set
(:class:`~llamaduo.bus.kv_cell.KVCell`), so replicas never lose each other's scores.

When the window is full and its mean similarity is below ``shadow.threshold``, the version is *degraded*, once:

* ``route.degraded`` is published (its event id depends only on the route and version);
* with ``shadow.remigrate.spec`` set, a new migration starts: the template spec with ``dataset.source:
  traffic:<route>`` (recent captured traffic) and a ``promotion`` that puts its model behind the route in the
  route's current mode and share, only if it beats the current model (``only_if_better``). Its id depends only on
  the route and version, so a redelivered score never starts a second one.

Failed judgements are not counted; a score seen twice (same request id within the window) is counted once. The
pure part (:func:`add_score`, :func:`remigration_spec`) needs no NATS.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from llamaduo.bus.kv_cell import KVCell
from llamaduo.contracts.events import (
    ShadowScoredEvent,
    Subject,
    route_envelope,
    start_envelope,
    validate_migration_id,
)
from llamaduo.contracts.gateway import RouteDegraded, ShadowScored
from llamaduo.contracts.routes import RouteState
from llamaduo.contracts.spec import MigrationSpec, load_spec, parse_spec
from llamaduo.services.gateway.config import GatewayConfig, RouteConfig

log = logging.getLogger("llamaduo.gateway.watch")

#: What one score did to its window.
Verdict = Literal["ignored", "duplicate", "counted", "degraded"]


class WindowScore(BaseModel):
    """One judged shadow answer in a window."""

    request_id: str = Field(description="The shadow request's id (a redelivered score is counted once)")
    similarity: float = Field(ge=1, le=100, description="The judge's similarity score, 1..100")


class ShadowWindow(BaseModel):
    """The rolling shadow score of one version of a route (one KV entry)."""

    route: str = Field(description="The route")
    version: str = Field(description="The version judged")
    scores: list[WindowScore] = Field(default_factory=list, description="The last `window` scores, oldest first")
    judged: int = Field(default=0, ge=0, description="Scores counted since the version was first judged")
    degraded: bool = Field(default=False, description="The version was found degraded (announced once)")
    rolling_score: float | None = Field(default=None, description="Mean similarity when it degraded")
    remigration_id: str | None = Field(default=None, description="The migration started to replace it, if any")

    def mean(self) -> float | None:
        """Mean similarity of the window (None when empty)."""
        return sum(s.similarity for s in self.scores) / len(self.scores) if self.scores else None


def add_score(window: ShadowWindow | None, scored: ShadowScored, *, size: int, threshold: float,
              remigration_id: str | None = None) -> tuple[ShadowWindow, Verdict]:
    """The window after ``scored`` and what it did: ``ignored`` (judging failed), ``duplicate`` (its request is
    in the window already), ``counted``, or ``degraded`` (this score filled a window whose mean similarity is below
    ``threshold``, for the first time for this version; ``remigration_id`` is then recorded)."""
    current = window or ShadowWindow(route=scored.route, version=scored.version)
    if scored.failed or scored.similarity is None:
        return current, "ignored"
    if any(s.request_id == scored.request_id for s in current.scores):
        return current, "duplicate"
    scores = [*current.scores, WindowScore(request_id=scored.request_id, similarity=scored.similarity)][-size:]
    after = current.model_copy(update={"scores": scores, "judged": current.judged + 1})
    mean = after.mean()
    if after.degraded or len(scores) < size or mean is None or mean >= threshold:
        return after, "counted"
    return after.model_copy(update={"degraded": True, "rolling_score": mean,
                                    "remigration_id": remigration_id}), "degraded"


def window_key(route: str, version: str) -> str:
    """The KV key of a route's version: ``<route>.<version>`` when the version is a plain name, else its hash
    (KV keys allow letters, digits, '-', '_', '=', '.', '/')."""
    safe = version if re.fullmatch(r"[A-Za-z0-9_=-]{1,64}", version) else \
        "h-" + hashlib.sha256(version.encode()).hexdigest()[:24]
    return f"{route}/{safe}"


def remigration_id_of(route: str, version: str) -> str:
    """The id of the migration that replaces a degraded version: the same for the same route and version."""
    return "m-" + hashlib.sha256(f"remigrate\x00{route}\x00{version}".encode()).hexdigest()[:12]


def remigration_spec(template: MigrationSpec, route: str, state: RouteState | None) -> MigrationSpec:
    """``template`` reading the route's recent captured traffic (``traffic:<route>``, the template's
    ``dataset.traffic`` window kept when it has one), promoted in the route's current mode and canary share (shadow
    when the route is off now) only if it beats the current model."""
    data = template.model_dump(mode="json", exclude_none=True)
    dataset = dict(data["dataset"])
    dataset["source"] = f"traffic:{route}"
    mode = state.mode if state is not None and state.mode != "off" else "shadow"
    promotion: dict[str, Any] = {"route": route, "mode": mode, "only_if_better": True}
    if mode == "canary" and state is not None and state.percent > 0:
        promotion["canary_percent"] = state.percent
    return parse_spec({**data, "dataset": dataset, "promotion": promotion}, origin=f"(re-migration of {route})")


def load_templates(config: GatewayConfig) -> dict[str, MigrationSpec]:
    """The re-migration template of every route that has one, loaded and validated like any spec (a wrong one
    is a :class:`~llamaduo.errors.SpecError` naming its file, at start)."""
    return {r.name: load_spec(r.shadow.remigrate.spec) for r in config.routes if r.shadow.remigrate is not None}


@dataclass
class Degradation:
    """What the watch decided for one score (``verdict``) and the window as written."""

    verdict: Verdict
    window: ShadowWindow


class ShadowWatch:
    """Counts ``shadow.scored`` into the windows of a bus's KV bucket and acts on a degradation.

    ``windows_kv`` and ``routes_kv`` are JetStream KV buckets (the watch's own, and the routes'); ``emit``
    publishes an envelope (the service's ``bus.emit``)."""

    def __init__(self, config: GatewayConfig, *, windows_kv: Any, routes_kv: Any, emit: Any,
                 templates: Mapping[str, MigrationSpec] | None = None) -> None:
        self.routes: dict[str, RouteConfig] = {r.name: r for r in config.routes}
        self.templates = dict(templates if templates is not None else load_templates(config))
        self.windows_kv, self.routes_kv, self.emit = windows_kv, routes_kv, emit
        self._cells: dict[str, KVCell[ShadowWindow]] = {}

    def cell(self, route: str, version: str) -> KVCell[ShadowWindow]:
        """The compare-and-set entry of a route's version (one per key, kept)."""
        key = window_key(route, version)
        if key not in self._cells:
            self._cells[key] = KVCell(
                self.windows_kv, key, what="shadow window", decode=ShadowWindow.model_validate_json,
                encode=lambda w: w.model_dump_json().encode())
        return self._cells[key]

    async def on_scored(self, scored: ShadowScored) -> Degradation | None:
        """Count one score; on the version's degradation publish ``route.degraded`` and start the re-migration.
        A score of a route this gateway does not configure is left alone (None)."""
        route = self.routes.get(scored.route)
        if route is None:
            log.info("shadow score of an unknown route ignored", extra={"route": scored.route})
            return None
        remigration = remigration_id_of(route.name, scored.version) if route.name in self.templates else None

        def apply(current: ShadowWindow | None) -> tuple[ShadowWindow, tuple[ShadowWindow, Verdict]]:
            after, verdict = add_score(current, scored, size=route.shadow.window,
                                       threshold=route.shadow.threshold, remigration_id=remigration)
            return after, (after, verdict)

        window, verdict = await self.cell(route.name, scored.version).change(apply)
        # a redelivered score of a degraded version publishes again: both ids are deterministic, so JetStream
        # drops the copies, and a crash between the write and the publish loses nothing
        if verdict == "degraded" or (verdict == "duplicate" and window.degraded):
            await self._degraded(route, window)
        return Degradation(verdict=verdict, window=window)

    async def _degraded(self, route: RouteConfig, window: ShadowWindow) -> None:
        log.warning("route degraded", extra={"route": route.name, "version": window.version,
                                             "rolling_score": window.rolling_score,
                                             "threshold": route.shadow.threshold,
                                             "remigration_id": window.remigration_id})
        if window.remigration_id is not None:
            state = await self._state(route.name)
            spec = remigration_spec(self.templates[route.name], route.name, state)
            await self.emit(start_envelope(window.remigration_id, spec.model_dump(mode="json")))
        try:
            migration_id: str | None = validate_migration_id(window.version)
        except ValueError:
            migration_id = None
        await self.emit(route_envelope(Subject.ROUTE_DEGRADED, RouteDegraded(
            route=route.name, version=window.version, window=route.shadow.window,
            rolling_score=window.rolling_score or 0.0, threshold=route.shadow.threshold,
            remigration_id=window.remigration_id), route.name, migration_id=migration_id,
            key=f"degraded-{window.version}"))

    async def _state(self, route: str) -> RouteState | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.routes_kv.get(route)
        except KeyNotFoundError:
            return None
        return RouteState.from_bytes(entry.value) if entry.value else None


def register_watch(bus: Any, config: GatewayConfig, templates: Mapping[str, MigrationSpec] | None = None) -> None:
    """Consume ``shadow.scored`` on ``bus`` (durable :data:`~llamaduo.bus.topology.GATEWAY_WATCH`, shared by the
    gateway's replicas) into a :class:`ShadowWatch` opened on the bus's buckets at the first score."""
    from llamaduo.bus.broker import Delivery
    from llamaduo.bus.topology import GATEWAY_WATCH, ROUTES_HISTORY, open_bucket, routes_bucket, shadow_bucket

    loaded = dict(templates if templates is not None else load_templates(config))
    opened: list[ShadowWatch] = []
    lock = asyncio.Lock()

    async def watch() -> ShadowWatch:
        async with lock:
            if not opened:
                stream = bus.settings.stream_name
                opened.append(ShadowWatch(
                    config, windows_kv=await open_bucket(bus.broker, bus.settings, shadow_bucket(stream)),
                    routes_kv=await open_bucket(bus.broker, bus.settings, routes_bucket(stream),
                                                history=ROUTES_HISTORY),
                    emit=bus.emit, templates=loaded))
        return opened[0]

    @bus.consumer(Subject.SHADOW_SCORED, GATEWAY_WATCH, Delivery(max_deliver=5, ack_wait=30.0, backoff=(1.0, 5.0)))
    async def on_shadow_scored(event: ShadowScoredEvent) -> None:
        """Count a shadow score into its route's rolling window (see the module docstring)."""
        await (await watch()).on_scored(event.payload)
