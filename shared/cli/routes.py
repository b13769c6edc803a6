"""``llamaduo promote ROUTE --version V --mode canary --percent 10`` and ``llamaduo rollback ROUTE``.

Both change the route's entry in the ``<stream>_ROUTES`` KV bucket by compare-and-set
(:class:`~llamaduo.bus.kv_cell.KVCell`: two operators at once cannot lose each other's change), then publish
``route.changed`` for observers. Every gateway replica watches the bucket: the change applies without a restart.

The adapter a promotion records: ``--adapter-key`` when given; else, for the version the route already has, its
adapter (and ``--local-model``, and the sha256 of the adapter's index) is kept; else, when the version is a
migration id whose ``report.json`` is in the artifact store (the migration completed), its model (key and
sha256); else none (the local server must already serve the version's name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llamaduo.cli.common import fail, load_settings

if TYPE_CHECKING:
    from llamaduo.contracts.events import ArtifactRef
    from llamaduo.contracts.routes import RouteMode, RouteState
    from llamaduo.settings import Settings
    from llamaduo.storage.store import ArtifactStore


async def open_routes(settings: Settings) -> tuple[Any, Any]:
    """``(connection, kv)``: a NATS connection and the routes bucket (created when no gateway made it yet)."""
    from llamaduo.bus.connection import connect
    from llamaduo.bus.topology import ROUTES_HISTORY, open_bucket, routes_bucket

    nc = await connect(settings)
    kv = await open_bucket(nc.jetstream(), settings, routes_bucket(settings.stream_name), history=ROUTES_HISTORY)
    return nc, kv


async def change_route(settings: Settings, route: str, change: Callable[[RouteState | None], RouteState], *,
                       reason: str, actor: str) -> tuple[RouteState | None, RouteState]:
    """Apply ``change`` to ``route``'s state by compare-and-set, publish ``route.changed``; ``(before, after)``."""
    from llamaduo.bus.client import ensure_stream
    from llamaduo.bus.kv_cell import KVCell
    from llamaduo.contracts.events import Subject, route_envelope, validate_migration_id
    from llamaduo.contracts.gateway import RouteChanged
    from llamaduo.contracts.routes import RouteState

    nc, kv = await open_routes(settings)
    try:
        cell: KVCell[RouteState] = KVCell(kv, route, what="route", decode=RouteState.from_bytes,
                                          encode=lambda state: state.to_bytes())
        before, after = await cell.change(lambda current: (new := change(current), (current, new)))
        try:
            migration_id = validate_migration_id(after.version) if after.version else None
        except ValueError:
            migration_id = None
        env = route_envelope(Subject.ROUTE_CHANGED, RouteChanged(
            route=route, mode=after.mode, percent=after.percent, version=after.version,
            local_model=after.local_model, adapter_key=after.adapter_key, previous=before, reason=reason,
            actor=actor), route, migration_id=migration_id, key=f"{reason}-{after.updated_at.isoformat()}")
        js = nc.jetstream()
        await ensure_stream(js, settings)
        await js.publish(settings.subject(env.type), env.to_bytes(), headers={"Nats-Msg-Id": env.event_id})
        return before, after
    finally:
        await nc.close()


def _describe(state: RouteState) -> dict[str, Any]:
    return {"mode": state.mode, "percent": state.percent, "version": state.version,
            "local_model": state.local_model, "adapter_key": state.adapter_key,
            "history": [v.version for v in state.history]}


def completed_model(store: ArtifactStore, version: str) -> ArtifactRef | None:
    """The model a completed migration ``version`` handed over (``model`` of its ``report.json``: key and
    sha256); None when ``version`` is no migration id or the migration has no report with a model."""
    from llamaduo.contracts.events import ArtifactRef, validate_migration_id
    from llamaduo.storage.keys import migration_key

    try:
        key = migration_key(validate_migration_id(version), "report.json")
    except ValueError:
        return None
    if not store.exists(key):
        return None
    model = (store.get_json(key) or {}).get("model")
    return ArtifactRef.model_validate(model) if isinstance(model, dict) and model.get("key") else None


async def promote_route(settings: Settings, route: str, version: str, mode: RouteMode, percent: float | None, *,
                        local_model: str | None = None, adapter_key: str | None = None,
                        actor: str = "") -> tuple[RouteState | None, RouteState]:
    """Promote ``version`` on ``route`` (``(before, after)``); the adapter as the module doc says."""
    from llamaduo.contracts.routes import promote
    from llamaduo.storage.store import ArtifactStore

    model = await asyncio.to_thread(completed_model, ArtifactStore(settings), version)

    def change(state: RouteState | None) -> RouteState:
        key, sha256 = adapter_key, None
        if model is not None and (key == model.key or (key is None and (
                state is None or state.version != version or not state.adapter_key))):
            key, sha256 = model.key, model.sha256
        return promote(state, version, mode, percent, local_model=local_model, adapter_key=key,
                       adapter_sha256=sha256)

    return await change_route(settings, route, change, reason="promote", actor=actor)


def _checked_route(route: str) -> str | None:
    from llamaduo.contracts.routes import validate_route_name

    try:
        validate_route_name(route)
    except ValueError as err:
        return str(err)
    return None


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote ``args.version`` on route ``args.route`` in ``args.mode`` (``--percent`` for a canary)."""
    from llamaduo.cli.cancel import requester

    if why := _checked_route(args.route):
        return fail(why)
    if args.mode == "canary" and args.percent is None:
        return fail("--mode canary needs --percent (the share answered locally, above 0 and at most 100)")
    if args.mode != "canary" and args.percent is not None:
        return fail(f"--percent applies to --mode canary only (mode {args.mode} answers "
                    f"{'every' if args.mode == 'full' else 'no'} request locally)")

    try:
        before, after = asyncio.run(promote_route(
            load_settings(), args.route, args.version, args.mode, args.percent, local_model=args.local_model,
            adapter_key=args.adapter_key, actor=requester()))
    except ValueError as err:  # a share out of range
        return fail(str(err))
    print(json.dumps({"route": args.route, "before": _describe(before) if before else None,
                      "after": _describe(after)}))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Roll route ``args.route`` back to its previous version (or ``off`` when it has none)."""
    from llamaduo.cli.cancel import requester
    from llamaduo.contracts.routes import RouteState, rollback

    if why := _checked_route(args.route):
        return fail(why)

    def change(state: RouteState | None) -> RouteState:
        return rollback(state or RouteState())

    before, after = asyncio.run(change_route(load_settings(), args.route, change, reason="rollback",
                                             actor=requester()))
    print(json.dumps({"route": args.route, "before": _describe(before) if before else None,
                      "after": _describe(after)}))
    return 0
