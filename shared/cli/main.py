"""``llamaduo``: run a migration, run a service, look at an installation.

Heavy imports live inside the commands, so ``--help`` and the light commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_SPEC = "invoice_demo.yaml"


def _settings() -> Any:
    from llamaduo.settings import Settings

    return Settings()


def _err(msg: str) -> int:
    print(f"llamaduo: {msg}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------- migrate


def _summary(migration_id: str, final: Any | None) -> dict[str, Any]:
    if final is None:
        return {"migration_id": migration_id, "status": "unknown", "rounds": []}
    p = final.payload
    rounds = [{
        "round": r.round, "training_rows": r.train_rows, "synthetic_rows": r.synthetic_rows,
        "aggregates": {k: round(v, 2) for k, v in r.aggregates.items()},
        "gate": r.gate_metric, "threshold": r.threshold, "decision": r.decision,
        "early_stopped": r.early_stopped,
    } for r in p.rounds]
    out = {"migration_id": migration_id, "status": "completed" if hasattr(p, "model") else "failed",
           "rounds": rounds, "service_tokens": p.usage.tokens, "cost": round(p.usage.cost, 6),
           "simulated_teacher": p.usage.simulated}
    if hasattr(p, "model"):
        out["model"] = p.model.key
        out["best_round"] = p.best_round
    else:
        out["reason"], out["detail"] = p.reason, p.detail
        out["model"] = p.best_model.key if p.best_model else None
    return out


def _print_table(summary: dict[str, Any], stream: Any) -> None:
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
    if summary.get("model"):
        console.print(f"model: {summary['model']}")
    if summary["status"] != "completed":
        console.print(f"reason: {summary.get('reason')}: {summary.get('detail')}")
    if summary.get("simulated_teacher"):
        console.print("teacher: simulated (offline oracle), no service LLM was called")


async def _watch_processes(embedded: Any) -> None:
    """Embedded mode: a service that dies ends the run with its log, instead of a silent wait."""
    while True:
        for p in embedded.processes:
            if p.proc.poll() is not None:
                tail = p.log_path.read_text()[-2000:] if p.log_path else ""
                raise RuntimeError(f"service {p.name} exited with code {p.proc.returncode}; "
                                   f"log {p.log_path}:\n{tail}")
        await asyncio.sleep(1.0)


def _progress_sink(spec: Any, migration_id: str, log: Any, live: bool) -> tuple[Any, Callable[[Any], None]]:
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

    def line(env: Any) -> None:
        print(f"[round {env.round}] {describe(env)}", file=log, flush=True)

    return contextlib.nullcontext(), line


async def _run_migration(settings: Any, spec: Any, migration_id: str, log: Any,
                         timeout: float | None, embedded: Any = None, live: bool = True) -> dict[str, Any]:
    from llamaduo.bus.client import TERMINAL, follow, publish_start, upload_dataset, wait_ready
    from llamaduo.storage.store import ArtifactStore

    if embedded is not None:
        await wait_ready(settings)
    store = ArtifactStore(settings)
    spec = await asyncio.to_thread(upload_dataset, store, migration_id, spec)
    await publish_start(settings, migration_id, spec)
    final = None

    display, show = _progress_sink(spec, migration_id, log, live)

    async def watch() -> None:
        nonlocal final
        with display:
            async for env in follow(settings, migration_id):
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
    return _summary(migration_id, final)


def cmd_migrate(args: argparse.Namespace, spec_path: Path | None = None) -> int:
    from llamaduo.contracts.events import new_migration_id, validate_migration_id
    from llamaduo.contracts.spec import SpecError, load_spec

    path = spec_path or Path(args.spec)
    try:
        spec = load_spec(path)
        migration_id = validate_migration_id(args.id) if args.id else new_migration_id()
    except (SpecError, ValueError) as err:
        return _err(str(err))
    log = sys.stderr if args.json else sys.stdout
    embedded = None
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a stopped CLI stops its embedded installation too
    from llamaduo.tasks.plugins import spec_code_problems

    if args.embedded and (problems := spec_code_problems(spec)):  # the embedded services run on this machine
        return _err("user code named in the spec cannot be loaded:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        if args.embedded:
            from llamaduo.runtime.embedded import Embedded

            data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="llamaduo-"))
            print(f"starting embedded NATS + S3 + 5 services under {data_dir}", file=log, flush=True)
            embedded = Embedded(data_dir).start()
            settings = embedded.settings
        else:
            settings = _settings()
        print(f"migration {migration_id}: task {spec.task.name!r}, student {spec.student.base_model}, "
              f"teacher {spec.teacher.provider}", file=log, flush=True)
        summary = asyncio.run(_run_migration(settings, spec, migration_id, log, args.timeout, embedded,
                                             live=not args.no_live))
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        return 130
    except TimeoutError:
        return _err(f"migration {migration_id} did not finish within {args.timeout}s")
    except (ConnectionError, RuntimeError) as err:
        return _err(str(err))
    finally:
        if embedded:
            embedded.stop()
    _print_table(summary, log)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["status"] == "completed" else 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    args.embedded = True
    args.spec = None
    with resources.as_file(resources.files("llamaduo.tasks").joinpath(DEMO_SPEC)) as path:
        return cmd_migrate(args, Path(path))


# ------------------------------------------------------------------------------------------- others


def cmd_service(args: argparse.Namespace) -> int:
    from llamaduo.runtime.service import SERVICES, run

    if args.name not in SERVICES:
        return _err(f"unknown service {args.name!r}; choose one of {', '.join(SERVICES)}")
    run(args.name)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from llamaduo.contracts.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        return _err(str(err))
    from llamaduo.tasks.plugins import spec_code_problems

    problems = spec_code_problems(spec)
    if problems:
        return _err(f"{args.spec}: user code named in the spec cannot be loaded here (the services that use it "
                    "need it too):\n" + "\n".join(f"  - {p}" for p in problems))
    print(f"{args.spec}: valid (task {spec.task.name!r}, student {spec.student.base_model})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llamaduo.bus.client import list_states

    try:
        states = asyncio.run(list_states(_settings(), args.id))
    except ConnectionError as err:
        return _err(str(err))
    if args.json:
        print(json.dumps([{k: s.get(k) for k in ("migration_id", "stage", "outcome")} | {
            "round": len(s.get("rounds", [])) - 1} for s in states]))
        return 0
    if not states:
        print("no migrations")
    for s in states:
        print(f"{s['migration_id']}: {s['stage']} (round {len(s.get('rounds', [])) - 1})"
              f"{' ' + s['outcome'] if s.get('outcome') else ''}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from llamaduo.bus.client import follow
    from llamaduo.reporting.progress import describe

    async def run() -> None:
        async for env in follow(_settings(), args.id, live=args.follow):
            print(env.model_dump_json() if args.json else
                  f"{env.occurred_at:%H:%M:%S} {env.migration_id} r{env.round} {env.type}: {describe(env)}",
                  flush=True)

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, ConnectionError) as err:
        return 0 if isinstance(err, KeyboardInterrupt) else _err(str(err))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llamaduo.reporting.html import ReportError, write_report
    from llamaduo.storage.store import ArtifactStore

    try:
        path = write_report(ArtifactStore(_settings()), args.id, Path(args.out or f"llamaduo-report-{args.id}"))
    except ReportError as err:
        return _err(str(err))
    except Exception as err:  # unreachable store, bad id: say which migration and why
        return _err(f"report of migration {args.id!r} not written: {type(err).__name__}: {err}")
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve migrated models behind an OpenAI-compatible API (``/v1/chat/completions``).

    A migration's model answers with its own spec's inference defaults and system prompt; ``--model`` folders
    with those of the last migration given (or the defaults).
    """
    from llamaduo.serving.server import ModelDefaults, fetch_migration_model, migration_defaults, serve

    models: dict[str, Path] = {}
    defaults: dict[str, ModelDefaults] = {}
    student = system_prompt = None
    for item in args.model or []:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            return _err(f"--model {item!r}: use NAME=FOLDER with a trained model folder")
        models[name] = Path(path)
    store = None
    for migration_id in args.migration or []:
        try:
            if store is None:
                from llamaduo.storage.store import ArtifactStore

                store = ArtifactStore(_settings())
            folder, spec = fetch_migration_model(store, migration_id, Path(args.cache))
        except Exception as err:
            return _err(f"migration {migration_id!r} has no model to serve: {type(err).__name__}: {err}")
        models[migration_id] = folder
        defaults[migration_id] = migration_defaults(spec)
        student, system_prompt = spec.student, spec.task.system_prompt
    if not models:
        return _err("nothing to serve: give --migration ID or --model NAME=FOLDER")
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(models, host=args.host, port=args.port, student=student, system_prompt=system_prompt or "",
          defaults=defaults)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Health check: NATS answers and the bucket is reachable (used by docker compose)."""
    from llamaduo.bus.connection import connect
    from llamaduo.storage.store import ArtifactStore

    settings = _settings()

    async def check() -> None:
        nc = await connect(settings)
        await nc.flush(timeout=5)
        await nc.close()

    try:
        asyncio.run(check())
        ArtifactStore(settings).ensure_bucket()
    except Exception as err:
        return _err(f"unhealthy: {err}")
    print("ok")
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from llamaduo.contracts.docs import asyncapi_yaml

    text = asyncapi_yaml()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaduo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def migration_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--id", help="migration id (default: generated)")
        p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
        p.add_argument("--data-dir", help="embedded mode: where servers keep their data (default: temp)")
        p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
        p.add_argument("--no-live", action="store_true",
                       help="one line per event instead of the live view (the default when not on a terminal)")

    p = sub.add_parser("migrate", help="run a migration from a spec file")
    p.add_argument("spec")
    p.add_argument("--embedded", action="store_true", help="start private NATS, S3 and the five services")
    migration_options(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="the invoice-extraction demo, embedded and offline")
    migration_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("service", help="run one service against LLAMADUO_NATS_URL / LLAMADUO_S3_ENDPOINT")
    p.add_argument("name")
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("validate", help="check a spec file and exit")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="migrations of a running installation")
    p.add_argument("id", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", help="the event log of a running installation")
    p.add_argument("id", nargs="?")
    p.add_argument("--follow", action="store_true", help="keep waiting for new events")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("report", help="write the HTML report (with PNG charts) of a migration")
    p.add_argument("id")
    p.add_argument("--out", help="folder (default: ./llamaduo-report-ID)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve migrated models behind an OpenAI-compatible API")
    p.add_argument("--migration", action="append", help="serve this migration's chosen model (repeatable)")
    p.add_argument("--model", action="append", help="NAME=FOLDER of a trained model folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache", default=".data/served", help="where downloaded models are kept")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ping", help="exit 0 when NATS and S3 answer (health check)")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("asyncapi", help="print the AsyncAPI document of the event contract")
    p.add_argument("--out")
    p.set_defaults(func=cmd_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
