"""Promotion of a completed migration's model onto a gateway route (the spec's ``promotion`` section).

When a transition completes a migration whose spec has ``promotion``, the controller writes the route's
:class:`~llamaduo.contracts.routes.RouteState` in the routes bucket (``<stream>_ROUTES``, compare-and-set through
:class:`~llamaduo.bus.kv_cell.KVCell`; every gateway replica watches it) and adds ``route.changed`` to the
transition's outputs (outbox, deterministic id). It runs before the transition is saved: a crash re-runs it on
redelivery, and promoting a version the route already has changes nothing but the write time.

With ``promotion.only_if_better`` the domain decides (``MigrationCompleted.promotion``) after judging the route's
current version on the eval split: :meth:`Promoter.baseline` looks that version up and copies its adapter under
this migration's prefix (the key comes from the operator-controlled routes bucket, never from the bus); only a
``promoted`` completion changes the route.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llamaduo.bus.kv_cell import KVCell
from llamaduo.bus.topology import ROUTES_HISTORY, open_bucket, routes_bucket
from llamaduo.contracts.events import ArtifactRef, Envelope, MigrationCompleted, RouteChanged, Subject, route_envelope
from llamaduo.contracts.routes import RouteState, promote, rollback
from llamaduo.contracts.spec import MigrationSpec, PromotionSpec, parse_spec
from llamaduo.contracts.state import MigrationState
from llamaduo.errors import StoreError
from llamaduo.storage.keys import baseline_adapter_key, check_key
from llamaduo.storage.store import ArtifactStore

log = logging.getLogger("llamaduo.controller.promotion")

#: Who ``route.changed`` names as the actor of a promotion on completion.
ACTOR = "controller"


def completed_event(outputs: list[Envelope]) -> Envelope | None:
    """The ``migration.completed`` among a transition's outputs, if any."""
    return next((o for o in outputs if o.type == Subject.MIGRATION_COMPLETED), None)


def promoted_state(current: RouteState | None, spec: MigrationSpec, promotion: PromotionSpec, migration_id: str,
                   completed: MigrationCompleted) -> tuple[RouteState, RouteState | None]:
    """The route's next state and the state before it (pure). Already at ``migration_id`` (a redelivery): the
    same promotion again, and the state before is the one a rollback would return to."""
    new = promote(current, migration_id, promotion.mode,
                  promotion.canary_percent if promotion.mode == "canary" else None,
                  local_model=spec.serve.model_name or migration_id, adapter_key=completed.model.key,
                  adapter_sha256=completed.model.sha256)
    if current is not None and current.version == migration_id:
        return new, rollback(current)
    return new, current


def route_changed(promotion: PromotionSpec, migration_id: str, new: RouteState,
                  previous: RouteState | None) -> Envelope:
    """The ``route.changed`` of a promotion on completion; one event id per migration and route."""
    change = RouteChanged(route=promotion.route, mode=new.mode, percent=new.percent, version=new.version,
                          local_model=new.local_model, adapter_key=new.adapter_key, previous=previous,
                          reason="promote", actor=ACTOR)
    return route_envelope(Subject.ROUTE_CHANGED, change, promotion.route, migration_id=migration_id,
                          key=f"promote|{migration_id}")


class Promoter:
    """Writes route states for completed migrations (one KV handle per controller process)."""

    def __init__(self, bus: Any) -> None:
        self._bus = bus
        self._kv: Any = None

    async def _cell(self, route: str) -> KVCell[RouteState]:
        if self._kv is None:
            self._kv = await open_bucket(self._bus.broker, self._bus.settings,
                                         routes_bucket(self._bus.settings.stream_name), history=ROUTES_HISTORY)
        return KVCell(self._kv, route, what="route", decode=RouteState.from_bytes, encode=RouteState.to_bytes)

    async def baseline(self, state: MigrationState,
                       store: ArtifactStore) -> tuple[str | None, ArtifactRef | None, str]:
        """For ``only_if_better``: the route's current version, its adapter copied under this migration's prefix
        (``round-N/baseline/adapter``, sha256 of its index recorded), and why it could not be copied (then the
        adapter is None). ``(None, None, "")`` when the route has no current version with an adapter (or it is
        this migration's own, promoted by an interrupted run)."""
        promotion = state.parsed_spec.promotion
        if promotion is None or state.baseline is None:
            return None, None, ""
        current, _ = await (await self._cell(promotion.route)).read()
        if current is None or current.version is None or not current.adapter_key:
            return None, None, ""
        if current.version == state.migration_id:
            return None, None, ""
        try:
            index = f"{check_key(current.adapter_key)}/_index.json"
            if not await asyncio.to_thread(store.exists, index):
                raise StoreError(f"{index} does not exist: not an adapter folder stored by llamaduo")
            copy = await asyncio.to_thread(store.copy_dir, current.adapter_key,
                                           baseline_adapter_key(state.migration_id, state.baseline.round))
        except StoreError as err:  # the operator's key is wrong: retrying cannot help
            log.warning("baseline adapter not copied", extra={"migration_id": state.migration_id,
                                                              "route": promotion.route, "reason": str(err)})
            return current.version, None, f"its adapter {current.adapter_key!r} could not be copied: {err}"
        log.info("baseline adapter copied", extra={"migration_id": state.migration_id, "route": promotion.route,
                                                   "version": current.version, "adapter": copy.key})
        return current.version, copy, ""

    async def on_transition(self, state: MigrationState, outputs: list[Envelope]) -> list[Envelope]:
        """Extra outputs of a transition: ``route.changed`` when it completed a migration whose model is to be
        promoted (``promotion: promoted``; the route state written first), else none."""
        completed = completed_event(outputs)
        if completed is None:
            return []
        spec = parse_spec(state.spec, origin=f"of migration {state.migration_id}")
        promotion = spec.promotion
        if promotion is None:
            return []
        payload = completed.payload
        if not isinstance(payload, MigrationCompleted):
            payload = MigrationCompleted.model_validate(payload)
        if payload.promotion != "promoted":
            log.info("route kept", extra={"migration_id": state.migration_id, "route": promotion.route,
                                          "promotion": payload.promotion, "detail": payload.promotion_detail})
            return []
        def apply(current: RouteState | None) -> tuple[RouteState, tuple[RouteState, RouteState | None]]:
            new, previous = promoted_state(current, spec, promotion, state.migration_id, payload)
            return new, (new, previous)

        cell = await self._cell(promotion.route)
        new, previous = await cell.change(apply)
        log.info("route promoted", extra={"migration_id": state.migration_id, "route": promotion.route,
                                          "mode": new.mode, "percent": new.percent})
        return [route_changed(promotion, state.migration_id, new, previous)]
