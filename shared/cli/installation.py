"""Commands against an installation: run one of its services, look at its migrations, check its health."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.cli.common import fail, load_settings
from llamaduo.errors import LlamaDuoError

if TYPE_CHECKING:
    from llamaduo.contracts.state import MigrationState


def cmd_service(args: argparse.Namespace) -> int:
    """Run one service against ``LLAMADUO_NATS_URL`` / ``LLAMADUO_S3_ENDPOINT`` until stopped."""
    from llamaduo.runtime.service import SERVICES, run

    if args.name not in SERVICES:
        return fail(f"unknown service {args.name!r}; choose one of {', '.join(SERVICES)}")
    run(args.name)
    return 0


def _round_rows(state: MigrationState) -> list[dict[str, Any]]:
    """One mapping per round: gate value, judged share, decision (None while the round is not gated)."""
    rows = []
    for r in state.rounds:
        s = r.summary
        rows.append({
            "round": r.round, "train_rows": r.train_rows, "synthetic_rows": r.synthetic_rows,
            "gate": s.gate_metric if s else None, "value": s.aggregates.get(s.gate_metric) if s else None,
            "threshold": s.threshold if s else None, "judged": s.judged if s else r.totals.judged,
            "failed": s.failed_judgements if s else r.totals.failed, "to_judge": s.to_judge if s else r.to_judge,
            "aggregates": s.aggregates if s else {}, "early_stopped": s.early_stopped if s else False,
            "decision": s.decision if s else None,
            "holdout": s.holdout_aggregates.get(s.gate_metric) if s else None,
            "holdout_judged": s.holdout_judged if s else 0,
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    """One line per migration (stage, latest round, outcome); with an id, also its rounds with their scores and
    decisions; ``--json``: the same as a JSON list (``rounds`` holds the per-round rows)."""
    from llamaduo.bus.client import list_states

    states = asyncio.run(list_states(load_settings(), args.id))
    if args.json:
        print(json.dumps([{"migration_id": s.migration_id, "stage": str(s.stage), "outcome": s.outcome,
                           "round": len(s.rounds) - 1, "rounds": _round_rows(s),
                           **({"promotion": s.promotion, "promotion_detail": s.promotion_detail}
                              if s.promotion else {})} for s in states]))
        return 0
    if not states:
        print("no migrations")
    for s in states:
        print(f"{s.migration_id}: {s.stage} (round {len(s.rounds) - 1}){' ' + s.outcome if s.outcome else ''}"
              + (f", {s.promotion}" if s.promotion in ("promoted", "kept_current") else ""))
        if not args.id:
            continue
        if s.promotion in ("promoted", "kept_current"):
            print(f"  promotion: {s.promotion}: {s.promotion_detail}")
        for row in _round_rows(s):
            value = "-" if row["value"] is None else f"{row['value']:.1f}"
            agg = row["aggregates"]
            others = " ".join(f"{k}={agg[k]:.1f}" for k in ("similarity_mean", "precision_mean", "coverage_50",
                                                             "precision_coverage_50") if k in agg)
            print(f"  round {row['round']}: {row['gate'] or 'gate'} {value}"
                  f"{'' if row['threshold'] is None else ' / ' + format(row['threshold'], 'g')}"
                  f"  judged {row['judged']}/{row['to_judge'] if row['to_judge'] is not None else '?'}"
                  f" (failed {row['failed']}){' early' if row['early_stopped'] else ''}"
                  f"  {others}  decision: {row['decision'] or 'pending'}"
                  + (f"  holdout {row['holdout']:.1f} ({row['holdout_judged']} judged)"
                     if row["holdout"] is not None else ""))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """The event log, one line (or ``--json`` object) per event; ``--follow`` waits for new ones."""
    from llamaduo.bus.client import follow
    from llamaduo.reporting.progress import describe

    async def run() -> None:
        async for env in follow(load_settings(), args.id, live=args.follow):
            print(env.model_dump_json() if args.json else
                  f"{env.occurred_at:%H:%M:%S} {env.migration_id or f'route {env.route}'} r{env.round} {env.type}: "
                  f"{describe(env)}",
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
