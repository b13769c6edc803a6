"""``llamaduo gateway --routes routes.yaml [--host H] [--port P]``: the OpenAI-compatible gateway of the routes.

It runs the ``gateway`` service (found by entry point, like every service) against the installation of the
``LLAMADUO_*`` settings, with the routes file and address passed in its environment. docs/gateway.md describes
the routes file and the promote / rollback commands.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llamaduo.cli.common import fail

#: The variables the gateway service reads (see the service's app module).
ROUTES_ENV, HOST_ENV, PORT_ENV = "LLAMADUO_GATEWAY_ROUTES", "LLAMADUO_GATEWAY_HOST", "LLAMADUO_GATEWAY_PORT"


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the routes of ``args.routes`` on ``args.host:args.port`` until interrupted."""
    from llamaduo.runtime.service import run

    routes = Path(args.routes)
    if not routes.is_file():
        return fail(f"--routes {args.routes!r}: no such file (a routes YAML file, see docs/gateway.md)")
    if not 0 <= args.port <= 65535:
        return fail(f"--port {args.port}: not a TCP port (0..65535)")
    os.environ[ROUTES_ENV] = str(routes.resolve())
    os.environ[HOST_ENV] = args.host
    os.environ[PORT_ENV] = str(args.port)
    run("gateway")
    return 0
