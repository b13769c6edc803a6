"""``llamaduo migrate`` and ``llamaduo demo``: run a migration and show it as it goes, then a summary table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llamaduo.cli.common import fail, load_settings

if TYPE_CHECKING:
    from llamaduo.contracts.events import Envelope
    from llamaduo.contracts.spec import MigrationSpec
    from llamaduo.runtime.embedded import Embedded
    from llamaduo.settings import Settings

DEMO_SPEC = "invoice_demo.yaml"


def summary(migration_id: str, final: Envelope | None) -> dict[str, Any]:
    """The migration's outcome from its terminal event (``migration.completed`` or ``.failed``); ``status`` is
    'completed', 'failed' or 'cancelled' (``migration.failed`` with reason ``cancelled``)."""
    from llamaduo.contracts.events import outcome_of

    if final is None:
        return {"migration_id": migration_id, "status": "unknown", "rounds": []}
    p = final.payload
    rounds = [{
        "round": r.round, "training_rows": r.train_rows, "synthetic_rows": r.synthetic_rows,
        "aggregates": {k: round(v, 2) for k, v in r.aggregates.items()},
        "gate": r.gate_metric, "threshold": r.threshold, "decision": r.decision,
        "early_stopped": r.early_stopped,
        "holdout": {k: round(v, 2) for k, v in r.holdout_aggregates.items()},
        "holdout_judged": r.holdout_judged, "holdout_to_judge": r.holdout_to_judge, "holdout_note": r.holdout_note,
    } for r in p.rounds]
    out = {"migration_id": migration_id, "status": outcome_of(final),
           "rounds": rounds, "service_tokens": p.usage.tokens, "cost": round(p.usage.cost, 6),
           "simulated_teacher": p.usage.simulated}
    if hasattr(p, "model"):
        out["model"] = p.model.key
        out["best_round"] = p.best_round
        out["promotion"], out["promotion_detail"] = p.promotion, p.promotion_detail
        out["baseline_score"] = p.baseline.score if p.baseline else None
    else:
        out["reason"], out["detail"] = p.reason, p.detail
        out["model"] = p.best_model.key if p.best_model else None
        out["best_round"] = p.best_round
    return out


def holdout_line(summary: dict[str, Any]) -> str:
    """The chosen round's holdout score beside its gate score (one line), or "" when no round has a holdout
    result; the holdout is judged once at the end with the chosen model and never decides anything."""
    for r in summary["rounds"]:
        if r.get("holdout") or r.get("holdout_note"):
            gate = r["gate"]
            gated = r["aggregates"].get(gate, 0.0)
            held = r["holdout"].get(gate)
            score = f"{gate} {held:.1f}" if held is not None else "no score"
            note = f" ({r['holdout_note']})" if r.get("holdout_note") else ""
            return (f"holdout, round {r['round']} (chosen; judged once at the end, never used for a decision): "
                    f"{score} on {r.get('holdout_judged', 0)}/{r.get('holdout_to_judge', 0)} answers, "
                    f"beside the gate's {gated:.1f} on the eval split{note}")
    return ""


def print_table(summary: dict[str, Any], stream: IO[str]) -> None:
    """The summary as a rich table of rounds, then the model and (if it failed) why."""
    from rich.console import Console
    from rich.table import Table

    rounds = summary["rounds"]
    gate = f"gate: {rounds[0]['gate']} >= {rounds[0]['threshold']}" if rounds else ""
    table = Table(title=f"migration {summary['migration_id']}: {summary['status']}", caption=gate)
    for col in ("round", "train rows", "synthetic", "judged", "similarity", "precision", ">=50 %", ">=70 %",
                "decision"):
        table.add_column(col, justify="right")
    for r in rounds:
        a = r["aggregates"]
        table.add_row(str(r["round"]), str(r["training_rows"]), str(r["synthetic_rows"]),
                      f"{a.get('judged', 0):.0f}{' (early)' if r.get('early_stopped') else ''}",
                      f"{a.get('similarity_mean', 0):.1f}", f"{a.get('precision_mean', 0):.1f}",
                      f"{a.get('coverage_50', 0):.1f}", f"{a.get('coverage_70', 0):.1f}", r["decision"] or "")
    console = Console(file=stream, width=max(120, Console(file=stream).width))
    console.print(table)
    if line := holdout_line(summary):
        console.print(line)
    if summary.get("model"):
        kept = f" (best round {summary.get('best_round')}, kept)" if summary["status"] == "cancelled" else ""
        console.print(f"model: {summary['model']}{kept}")
    if summary.get("promotion") in ("promoted", "kept_current"):
        console.print(f"promotion: {summary['promotion']}: {summary.get('promotion_detail')}")
    if summary["status"] == "cancelled":
        console.print(f"cancelled: {summary.get('detail')}")
    elif summary["status"] != "completed":
        console.print(f"reason: {summary.get('reason')}: {summary.get('detail')}")
    if summary.get("simulated_teacher"):
        console.print("teacher: simulated (offline oracle), no service LLM was called")
    if summary.get("stages"):
        from llamaduo.reporting.timeline import StageSplit, describe_split

        console.print(f"wall time by stage: {describe_split(StageSplit.model_validate(summary['stages']))}")


async def _watch_processes(embedded: Embedded) -> None:
    """Embedded mode: a service that dies ends the run with its log, instead of a silent wait."""
    from llamaduo.runtime.local_servers import ServerError

    while True:
        for p in embedded.processes:
            if p.proc.poll() is not None:
                tail = p.log_path.read_text()[-2000:] if p.log_path else ""
                raise ServerError(f"service {p.name} exited with code {p.proc.returncode}; "
                                  f"log {p.log_path}:\n{tail}")
        await asyncio.sleep(1.0)


def progress_sink(spec: MigrationSpec, migration_id: str, log: IO[str],
                  live: bool) -> tuple[contextlib.AbstractContextManager[Any], Callable[[Envelope], None]]:
    """Where events go while a migration runs: a live rich view on a terminal, else one line per event.

    Returns ``(context manager, update)``.
    """
    from rich.console import Console

    from llamaduo.reporting.progress import LiveProgress, MigrationView, describe

    console = Console(file=log)
    if live and console.is_terminal:
        view = MigrationView(migration_id, gate=spec.judge.gate, threshold=spec.judge.threshold,
                             max_rounds=spec.budget.max_rounds)
        progress = LiveProgress(view, console)
        return progress, progress.update

    def line(env: Envelope) -> None:
        print(f"[round {env.round}] {describe(env)}", file=log, flush=True)

    return contextlib.nullcontext(), line


async def run_migration(settings: Settings, spec: MigrationSpec, migration_id: str, log: IO[str],
                        timeout: float | None, embedded: Embedded | None = None,
                        live: bool = True) -> dict[str, Any]:
    """Start the migration, show its events until it ends (or ``timeout``), return its :func:`summary`."""
    from llamaduo.bus.client import TERMINAL, follow, publish_start, upload_dataset, wait_ready
    from llamaduo.storage.store import ArtifactStore

    if embedded is not None:
        await wait_ready(settings)
    store = ArtifactStore(settings)
    spec = await asyncio.to_thread(upload_dataset, store, migration_id, spec)
    await publish_start(settings, migration_id, spec)
    from llamaduo.reporting.timeline import Timeline

    final = None
    timeline = Timeline()  # the times of the events, for the stage split at the end

    display, show = progress_sink(spec, migration_id, log, live)

    async def watch() -> None:
        nonlocal final
        with display:
            async for env in follow(settings, migration_id):
                timeline.add(env)
                show(env)
                if env.type in TERMINAL:
                    final = env

    tasks = [asyncio.ensure_future(watch())]
    if embedded is not None:
        tasks.append(asyncio.ensure_future(_watch_processes(embedded)))
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
    result = summary(migration_id, final)
    if final is not None:
        with contextlib.suppress(ValueError):  # migration.start not seen: the split is left out
            result["stages"] = timeline.split().model_dump()
    return result


def cmd_migrate(args: argparse.Namespace, spec_path: Path | None = None) -> int:
    """Run a migration from a spec file (``--embedded``: on a private installation started for it)."""
    from llamaduo.cli.preflight import preflight
    from llamaduo.contracts.events import new_migration_id, validate_migration_id
    from llamaduo.contracts.spec import load_spec

    spec = load_spec(spec_path or Path(args.spec))
    # everything knowable is checked before any server starts (keys, model, user code: embedded only,
    # a running installation's services have their own environment)
    preflight(spec, services_here=args.embedded).raise_if_problems(str(spec_path or args.spec))
    try:
        migration_id = validate_migration_id(args.id) if args.id else new_migration_id()
    except ValueError as err:
        return fail(str(err))
    log = sys.stderr if args.json else sys.stdout
    embedded = None
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a stopped CLI stops its embedded installation too
    try:
        if args.embedded:
            from llamaduo.runtime.embedded import Embedded

            data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="llamaduo-"))
            print(f"starting embedded NATS + S3 + 5 services under {data_dir}", file=log, flush=True)
            embedded = Embedded(data_dir).start()
            settings = embedded.settings
        else:
            settings = load_settings()
        print(f"migration {migration_id}: task {spec.task.name!r}, student {spec.student.base_model}, "
              f"teacher {spec.teacher.provider}", file=log, flush=True)
        result = asyncio.run(run_migration(settings, spec, migration_id, log, args.timeout, embedded,
                                           live=not args.no_live))
    except KeyboardInterrupt:
        if embedded is not None:
            print("interrupted; stopping the embedded installation (and its migration)", file=sys.stderr)
        else:
            print(f"interrupted: detached from migration {migration_id}, which keeps running on the installation; "
                  f"`llamaduo cancel {migration_id}` stops it, `llamaduo events {migration_id} --follow` "
                  "shows it", file=sys.stderr)
        return 130
    except TimeoutError:
        return fail(f"migration {migration_id} did not finish within {args.timeout}s")
    finally:
        if embedded:
            embedded.stop()
    print_table(result, log)
    if args.json:
        print(json.dumps(result))
    return 0 if result["status"] == "completed" else 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    """The invoice-extraction demo: :func:`cmd_migrate` on the packaged spec, embedded and offline."""
    from llamaduo.reporting.timeline import duration

    args.embedded = True
    args.spec = None
    began = time.monotonic()
    with resources.as_file(resources.files("llamaduo.tasks").joinpath(DEMO_SPEC)) as path:
        code = cmd_migrate(args, Path(path))
    print(f"demo wall time: {duration(time.monotonic() - began)} (servers and services started and stopped "
          "included; setting up .venv not)", file=sys.stderr if args.json else sys.stdout)
    return code
