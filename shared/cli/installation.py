"""Commands against an installation: run one of its services, look at its migrations, check its health."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from llamaduo.cli.common import fail, load_settings
from llamaduo.errors import LlamaDuoError


def cmd_service(args: argparse.Namespace) -> int:
    """Run one service against ``LLAMADUO_NATS_URL`` / ``LLAMADUO_S3_ENDPOINT`` until stopped."""
    from llamaduo.runtime.service import SERVICES, run

    if args.name not in SERVICES:
        return fail(f"unknown service {args.name!r}; choose one of {', '.join(SERVICES)}")
    run(args.name)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """One line per migration (stage, latest round, outcome); ``--json``: the same as a JSON list."""
    from llamaduo.bus.client import list_states

    states = asyncio.run(list_states(load_settings(), args.id))
    if args.json:
        print(json.dumps([{"migration_id": s.migration_id, "stage": str(s.stage), "outcome": s.outcome,
                           "round": len(s.rounds) - 1} for s in states]))
        return 0
    if not states:
        print("no migrations")
    for s in states:
        print(f"{s.migration_id}: {s.stage} (round {len(s.rounds) - 1}){' ' + s.outcome if s.outcome else ''}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """The event log, one line (or ``--json`` object) per event; ``--follow`` waits for new ones."""
    from llamaduo.bus.client import follow
    from llamaduo.reporting.progress import describe

    async def run() -> None:
        async for env in follow(load_settings(), args.id, live=args.follow):
            print(env.model_dump_json() if args.json else
                  f"{env.occurred_at:%H:%M:%S} {env.migration_id} r{env.round} {env.type}: {describe(env)}",
                  flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report of a migration (and upload it); print the page's path."""
    from llamaduo.reporting.html import write_report
    from llamaduo.storage.store import ArtifactStore

    try:
        path = write_report(ArtifactStore(load_settings()), args.id, Path(args.out or f"llamaduo-report-{args.id}"))
    except LlamaDuoError:
        raise  # e.g. no manifest: mapped by main
    except Exception as err:  # the store's client raises its own types: say which migration and why
        return fail(f"report of migration {args.id!r} not written: {type(err).__name__}: {err}")
    print(path)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Health check: NATS answers and the bucket is reachable (used by docker compose)."""
    from llamaduo.bus.connection import connect
    from llamaduo.storage.store import ArtifactStore

    settings = load_settings()

    async def check() -> None:
        nc = await connect(settings)
        await nc.flush(timeout=5)
        await nc.close()

    try:
        asyncio.run(check())
        ArtifactStore(settings).ensure_bucket()
    except Exception as err:  # a health check reports any failure as unhealthy, whatever raised it
        return fail(f"unhealthy: {err}")
    print("ok")
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    """Print (or ``--out``: write) the AsyncAPI document of the event contract."""
    from llamaduo.contracts.docs import asyncapi_yaml

    text = asyncapi_yaml()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0
