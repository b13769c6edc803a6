"""Gateway bus adapter: the OpenAI-compatible front of the routes in ``LLAMADUO_GATEWAY_ROUTES``, run as a
service (``llamaduo gateway --routes routes.yaml`` sets the variables and runs ``llamaduo service gateway``).

It *watches* the routes' KV bucket (``<stream>_ROUTES``, :func:`routes_bucket`), so a
``llamaduo promote`` / ``llamaduo rollback`` applies on every replica without a restart, and it *publishes*
``traffic.logged``, ``route.fallback`` and ``shadow.request`` (the gateway's events,
:mod:`llamaduo.contracts.gateway`) through the bus. It consumes one subject, ``shadow.scored``, in the shadow
watch shared by the replicas (:mod:`llamaduo.services.gateway.watch`: rolling scores, ``route.degraded``, the
re-migration). Captured traffic goes to S3 through the one :class:`ArtifactStore`. Without ``LLAMADUO_GATEWAY_ROUTES``
(e.g. when the contract documentation registers every service) nothing is started.

The listening socket is bound when the service is built, so an address in use fails the start with its reason;
HTTP is served in the service's event loop from the moment NATS is connected until the service stops, and the
buffered traffic is written before the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from llamaduo.bus.broker import Bus
from llamaduo.bus.topology import ROUTES_HISTORY, open_bucket, routes_bucket
from llamaduo.errors import SpecError
from llamaduo.services.gateway.adapters import AdapterLoader
from llamaduo.services.gateway.capture import TrafficCapture
from llamaduo.services.gateway.config import GatewayConfig, load_routes
from llamaduo.services.gateway.gateway import Gateway
from llamaduo.services.gateway.server import create_app
from llamaduo.services.gateway.watch import register_watch
from llamaduo.serving.guard import ServingLimits
from llamaduo.storage.store import ArtifactStore

log = logging.getLogger("llamaduo.gateway")

#: The routes file the service reads (``llamaduo gateway --routes`` sets it).
ROUTES_ENV = "LLAMADUO_GATEWAY_ROUTES"
#: Interface and port the service listens on (``--host`` / ``--port``).
HOST_ENV, PORT_ENV = "LLAMADUO_GATEWAY_HOST", "LLAMADUO_GATEWAY_PORT"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port); :class:`SpecError` naming it when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0 (socket.create_server's): asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # protocol says TCP; without it every answer waits ~40 ms for the client's delayed ACK (bench_gateway.py)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise SpecError(f"the gateway cannot listen on {host}:{port}: {err.strerror or err}; choose another "
                        f"--port (or {PORT_ENV})") from None
    sock.setblocking(False)
    return sock


class GatewayService:
    """One gateway replica on a bus: :meth:`start` serves, :meth:`stop` ends and writes buffered traffic."""

    def __init__(self, bus: Bus, store: ArtifactStore, config: GatewayConfig, sock: socket.socket) -> None:
        self.bus = bus
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        loads = any(r.local is not None and r.local.load_adapters for r in config.routes)
        self.gateway = Gateway(config, emit=bus.emit, capture=TrafficCapture(
            store, batch_rows=config.capture.batch_rows, batch_seconds=config.capture.batch_seconds),
            adapters=AdapterLoader({r.name: r for r in config.routes}, store) if loads else None)
        self.app = create_app(self.gateway, limits=ServingLimits.from_settings(
            bus.settings, max_concurrent=bus.settings.gateway_max_concurrent,
            max_waiting=bus.settings.gateway_max_waiting))
        self._server: Any = None
        self._serving: asyncio.Task[Any] | None = None
        #: the task of :meth:`run`, when :func:`register` started it
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = self.sock.getsockname()[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        """Connect (the bus's connection), read and watch the route states, then serve HTTP."""
        import uvicorn

        await self.bus.broker.connect()
        kv = await open_bucket(self.bus.broker, self.bus.settings, routes_bucket(self.bus.settings.stream_name),
                               history=ROUTES_HISTORY)
        await self.gateway.start(kv)
        self._server = uvicorn.Server(uvicorn.Config(self.app, lifespan="off", log_level="warning"))
        self._serving = asyncio.ensure_future(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise RuntimeError("the gateway's HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        log.info("gateway serving", extra={"url": self.url, "routes": list(self.gateway.routes)})

    async def stop(self) -> None:
        """Stop serving (in-flight requests finish), then write buffered traffic and close the clients."""
        if self._server is not None:
            self._server.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._serving
        await self.gateway.aclose()
        self.sock.close()

    async def run(self) -> None:
        """Serve until the service stops (its bus's ``stopping``, or HTTP ending on a signal)."""
        try:
            await self.start()
            while not self.bus.stopping.is_set() and not (self._serving and self._serving.done()):
                await asyncio.sleep(0.2)
        except Exception:
            log.exception("the gateway failed; stopping the service")
            os.kill(os.getpid(), 15)
        finally:
            await asyncio.shield(self.stop())


def register(bus: Bus, store: ArtifactStore) -> None:
    """Start the gateway of ``LLAMADUO_GATEWAY_ROUTES`` with the service (nothing without it)."""
    path = os.environ.get(ROUTES_ENV)
    if not path:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # built outside a running service (documentation): nothing to serve
        return
    config = load_routes(path)
    port = os.environ.get(PORT_ENV, str(DEFAULT_PORT))
    if not port.isdigit():
        raise SpecError(f"{PORT_ENV}={port!r} is not a TCP port number")
    register_watch(bus, config)  # a wrong re-migration template fails the start, naming its file
    service = GatewayService(bus, store, config, bind(os.environ.get(HOST_ENV, DEFAULT_HOST), int(port)))
    service.task = loop.create_task(service.run(), name="llamaduo-gateway")
    bus.gateway = service  # type: ignore[attr-defined]  # reachable for diagnostics
