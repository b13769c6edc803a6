"""Running the server: :func:`serve` blocks (``llamaduo serve``); :class:`BackgroundServer` serves from a thread
of this process and takes more models while it runs (the inference service, once a migration completes, when its
spec's ``serve.enabled`` is set). Heavy libraries (uvicorn) are imported when first needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llamaduo.contracts.spec import StudentSpec
from llamaduo.serving.app import create_app
from llamaduo.serving.engine import ModelDefaults
from llamaduo.serving.guard import ServingLimits
from llamaduo.serving.registry import ModelRegistry


def serve(
    models: Mapping[str, Path | str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    student: StudentSpec | None = None,
    system_prompt: str = "",
    defaults: Mapping[str, ModelDefaults] | None = None,
    log_level: str = "info",
    limits: ServingLimits | None = None,
    adapters_dir: Path | str | None = None,
) -> None:
    """Load ``models`` and serve them over HTTP until interrupted (blocking). See :func:`create_app`."""
    import uvicorn

    app = create_app(models, student, system_prompt=system_prompt, defaults=defaults, limits=limits,
                     adapters_dir=adapters_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _bind(host: str, port: int) -> Any:
    """A TCP socket bound to ``host:port`` (0: a free port); ``OSError`` when the port is taken."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """uvicorn serving an ASGI app in a daemon thread of this process, on an already bound socket.

    Build it with :meth:`start`; ``url`` is its base URL (``http://host:port``); :meth:`stop` ends it.
    """

    def __init__(self, server: Any, thread: threading.Thread, sock: Any, host: str) -> None:
        self.server, self.thread, self.sock = server, thread, sock
        self.port: int = sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @classmethod
    def start(
        cls, app: Any, host: str = "127.0.0.1", port: int = 0, *, sock: Any | None = None, timeout: float = 30.0,
        log_level: str = "warning",
    ) -> ServerThread:
        """Serve ``app`` on ``sock`` (default: bind ``host:port`` now, ``OSError`` when taken); returns once up."""
        import uvicorn

        sock = sock if sock is not None else _bind(host, port)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llamaduo-serve", daemon=True)
        thread.start()
        running = cls(server, thread, sock, host)
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                running.stop(timeout)
                raise RuntimeError(f"the server on {host}:{running.port} did not start")
            time.sleep(0.02)
        return running

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit and wait for its thread (at most ``timeout`` seconds)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``).

    ``port`` 0 picks a free port. The server stops when the block exits.
    """
    running = ServerThread.start(app, host, port, timeout=timeout)
    try:
        yield running.url
    finally:
        running.stop(timeout)


class BackgroundServer:
    """An OpenAI-compatible server in a thread of this process whose models are added while it runs.

    The first :meth:`publish` binds ``host:port`` (an ``OSError`` such as "address already in use" when it is
    taken; nothing is loaded then) and starts the server; later ones add models or replace those of the same name.
    ``limits``: the guard's (see :class:`~llamaduo.serving.guard.ServingLimits`).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
        limits: ServingLimits | None = None,
    ) -> None:
        self.host, self.port, self.log_level, self.limits = host, port, log_level, limits
        self.registry: ModelRegistry | None = None
        self.running: ServerThread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str | None:
        """Base URL (``http://host:port``) once started, else None."""
        return self.running.url if self.running is not None else None

    def publish(
        self, models: Mapping[str, Path | str], defaults: Mapping[str, ModelDefaults] | None = None
    ) -> list[str]:
        """Load ``models`` (name -> folder) and serve them; returns the names that replaced served models.

        Blocking (loads models): call it from a worker thread.
        """
        with self._lock:
            if self.running is not None and self.registry is not None:
                return self.registry.add(ModelRegistry(models, defaults))
            sock = _bind(self.host, self.port)
            try:
                registry = ModelRegistry(models, defaults)
                running = ServerThread.start(
                    create_app({}, registry=registry, limits=self.limits), self.host, sock=sock,
                    log_level=self.log_level)
            except BaseException:
                sock.close()
                raise
            self.registry, self.running = registry, running
            return []

    def stop(self) -> None:
        """Stop serving (the loaded models are dropped)."""
        with self._lock:
            if self.running is not None:
                self.running.stop()
            self.running = self.registry = None
