"""``llamaduo``: run a migration, run a service, look at an installation.

Heavy imports live inside the commands, so ``--help`` and the light commands start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from llamaduo import __version__
from llamaduo.cli.cancel import cmd_cancel
from llamaduo.cli.common import fail
from llamaduo.cli.gateway import cmd_gateway
from llamaduo.cli.installation import cmd_asyncapi, cmd_events, cmd_ping, cmd_report, cmd_service, cmd_status
from llamaduo.cli.migrate import cmd_demo, cmd_migrate
from llamaduo.cli.pull import cmd_pull
from llamaduo.cli.routes import cmd_promote, cmd_rollback
from llamaduo.cli.serve import cmd_serve
from llamaduo.cli.validate import cmd_validate
from llamaduo.errors import LlamaDuoError

DESCRIPTION = """\
Migrate a task from a paid service LLM (OpenAI, Gemini, any OpenAI-compatible server) to a small local
model: fine-tune the student, let the service LLM judge its answers, synthesize more training data while
the score is below the gate, and train again."""

EPILOG = """\
start here:
  llamaduo validate examples/openai.yaml          check a spec and everything it names
  llamaduo migrate examples/openai.yaml --embedded run it on a private installation
  llamaduo demo                                    the offline invoice demo (no key needed)

`llamaduo COMMAND --help` explains a command."""


class _ServiceNames:
    """The service names (:data:`llamaduo.runtime.service.SERVICES`) as argparse choices, imported only when
    argparse looks at them: the runtime module loads the bus client, and every other command starts fast."""

    @staticmethod
    def _names() -> tuple[str, ...]:
        from llamaduo.runtime.service import SERVICES

        return SERVICES

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def make_parser() -> argparse.ArgumentParser:
    """The ``llamaduo`` argument parser: one subcommand per command, each naming its function."""
    parser = argparse.ArgumentParser(prog="llamaduo", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def migration_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--id", help="migration id (default: generated)")
        p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
        p.add_argument("--data-dir", help="embedded mode: where servers keep their data (default: temp)")
        p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
        p.add_argument("--no-live", action="store_true",
                       help="one line per event instead of the live view (the default when not on a terminal)")

    p = sub.add_parser("migrate", help="run a migration from a spec file",
                       description="Check the spec (as `validate` does), then run the migration and show its "
                       "progress; exit 0 only when it completes.")
    p.add_argument("spec", help="the migration spec (YAML); see examples/")
    p.add_argument("--embedded", action="store_true", help="start private NATS, S3 and the five services")
    migration_options(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="the invoice-extraction demo, embedded and offline")
    migration_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("service", help="run one service against LLAMADUO_NATS_URL / LLAMADUO_S3_ENDPOINT")
    p.add_argument("name", choices=_ServiceNames(), metavar="NAME",
                   help="the service: one of %(choices)s")
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("validate", help="check a spec file and everything it names, then exit",
                       description="Check the spec and what can be known before a migration starts: the dataset "
                       "(file, columns, split sizes), API key variables, prices under a cost budget, the base "
                       "model (without downloading it) and user code. Every problem is listed at once.")
    p.add_argument("spec", help="the migration spec (YAML)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("cancel", help="cancel a running migration: it ends 'cancelled', keeping its best round")
    p.add_argument("id", help="the migration id")
    p.add_argument("--reason", help="why (shown in the migration's terminal event)")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the migration to end cancelled (0: do not wait)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="migrations of a running installation")
    p.add_argument("id", nargs="?", help="one migration's rounds (default: every migration)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", help="the event log of a running installation")
    p.add_argument("id", nargs="?", help="one migration's events (default: every migration's)")
    p.add_argument("--follow", action="store_true", help="keep waiting for new events")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("report", help="write the HTML report (with PNG charts) of a migration")
    p.add_argument("id", help="the migration id")
    p.add_argument("--out", help="folder (default: ./llamaduo-report-ID)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve migrated models behind an OpenAI-compatible API")
    p.add_argument("--migration", action="append", help="serve this migration's chosen model (repeatable)")
    p.add_argument("--model", action="append", help="NAME=FOLDER of a trained model folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--cache", default=".data/served", help="where downloaded models are kept")
    p.add_argument("--api-keys-file", help="file of bearer keys, one a line (with LLAMADUO_API_KEYS[_FILE]); "
                   "none anywhere: no key is asked")
    p.add_argument("--adapters-dir", help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, loading "
                   "adapter folders from inside this folder only")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default: LLAMADUO_SERVE_MAX_BODY_BYTES "
                   "or 1 MiB)")
    p.add_argument("--max-total-tokens", type=int, help="cap on max_tokens x n per request (default: 16384)")
    p.add_argument("--max-concurrent", type=int, help="generation requests running at once (default: 4)")
    p.add_argument("--max-waiting", type=int, help="generation requests waiting; 429 beyond (default: 16)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("gateway", help="OpenAI-compatible gateway: each route (a task alias sent as `model`) "
                       "answered by its service LLM or, once promoted, by the local model (docs/gateway.md)")
    p.add_argument("--routes", required=True, help="the routes file (YAML; see docs/gateway.md)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("promote", help="promote a version on a gateway route (applies on every gateway at once)")
    p.add_argument("route", help="the route name")
    p.add_argument("--version", required=True, help="the version to promote (the migration id that produced it)")
    p.add_argument("--mode", choices=("shadow", "canary", "full"), default="canary",
                   help="shadow: compared only; canary: --percent of users answered locally; full: every request "
                   "(default: %(default)s)")
    p.add_argument("--percent", type=float, help="canary share answered locally (above 0, at most 100)")
    p.add_argument("--local-model", help="the name the local server serves the version under (default: VERSION)")
    p.add_argument("--adapter-key", help="S3 key of the version's adapter (recorded with the route)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="put a gateway route back on its previous version (off when none)")
    p.add_argument("route", help="the route name")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("pull", help="download a base model (Hugging Face id) or build a built-in one, into the "
                       "cache the services read")
    p.add_argument("model", help="a Hugging Face id, smollm2-135m or tiny:<preset>")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ping", help="exit 0 when NATS and S3 answer (health check)")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("asyncapi", help="print the AsyncAPI document of the event contract")
    p.add_argument("--out", help="write it to this file instead of stdout")
    p.set_defaults(func=cmd_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command.

    Commands raise :class:`~llamaduo.errors.LlamaDuoError` for what the user can fix; this is the one place
    that turns it into ``llamaduo: <message>`` on stderr and the error's exit code. Anything else is a bug
    and keeps its traceback. A reader that stops reading (``llamaduo asyncapi | head -1``) ends the command
    quietly, as the Python documentation recommends for SIGPIPE.
    """
    args = make_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except LlamaDuoError as err:
        return fail(str(err), err.exit_code)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
