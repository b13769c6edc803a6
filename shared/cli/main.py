"""``llamaduo``: run a migration, run a service, look at an installation.

Heavy imports live inside the commands, so ``--help`` and the light commands start fast.
"""

from __future__ import annotations

import argparse
import sys

from llamaduo.cli.cancel import cmd_cancel
from llamaduo.cli.common import fail
from llamaduo.cli.installation import cmd_asyncapi, cmd_events, cmd_ping, cmd_report, cmd_service, cmd_status
from llamaduo.cli.migrate import cmd_demo, cmd_migrate
from llamaduo.cli.pull import cmd_pull
from llamaduo.cli.serve import cmd_serve
from llamaduo.cli.validate import cmd_validate
from llamaduo.errors import LlamaDuoError


def make_parser() -> argparse.ArgumentParser:
    """The ``llamaduo`` argument parser: one subcommand per command, each naming its function."""
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

    p = sub.add_parser("cancel", help="cancel a running migration: it ends 'cancelled', keeping its best round")
    p.add_argument("id")
    p.add_argument("--reason", help="why (shown in the migration's terminal event)")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the migration to end cancelled (0: do not wait)")
    p.set_defaults(func=cmd_cancel)

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

    p = sub.add_parser("pull", help="download a base model (Hugging Face id) or build a built-in one, into the "
                       "cache the services read")
    p.add_argument("model", help="a Hugging Face id, smollm2-135m or tiny:<preset>")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ping", help="exit 0 when NATS and S3 answer (health check)")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("asyncapi", help="print the AsyncAPI document of the event contract")
    p.add_argument("--out")
    p.set_defaults(func=cmd_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command.

    Commands raise :class:`~llamaduo.errors.LlamaDuoError` for what the user can fix; this is the one place
    that turns it into ``llamaduo: <message>`` on stderr and the error's exit code. Anything else is a bug
    and keeps its traceback.
    """
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LlamaDuoError as err:
        return fail(str(err), err.exit_code)


if __name__ == "__main__":
    sys.exit(main())
