"""Running one service: connect, register its handlers, serve until SIGTERM/SIGINT, drain, stop."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import time
from collections.abc import Callable
from importlib.metadata import entry_points

from llamaduo.bus.broker import Bus
from llamaduo.runtime.logs import setup_logging
from llamaduo.runtime.metrics import start_exporter
from llamaduo.settings import Settings
from llamaduo.storage.store import ArtifactStore

#: The services a migration needs (the embedded installation starts these).
MIGRATION_SERVICES = ("controller", "trainer", "inference", "judge", "synthesizer")
#: Every service: the migration's, and the gateway in front of the service LLM (``llamaduo gateway``).
SERVICES = (*MIGRATION_SERVICES, "gateway")
#: Entry-point group naming each service's ``register(bus, store)`` (see pyproject.toml).
SERVICE_ENTRY_POINTS = "llamaduo.services"
#: Libraries a service imports before it takes its first message, so that its first request does not pay for
#: them (seconds on a small CPU). Before, not beside: a lazy package (transformers) imported from two threads
#: at once can fail in one of them.
PRELOAD: dict[str, tuple[str, ...]] = {
    "trainer": ("peft", "trl.trainer.sft_trainer", "datasets"),
    "inference": ("peft", "transformers.generation"),
}

log = logging.getLogger("llamaduo.runtime.service")


def registrar(name: str) -> Callable[[Bus, ArtifactStore], None]:
    """The ``register(bus, store)`` function of service ``name``."""
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    found = entry_points(group=SERVICE_ENTRY_POINTS, name=name)
    if not found:
        raise LookupError(f"service {name!r} is not installed: no {SERVICE_ENTRY_POINTS!r} entry point of that name "
                          "(reinstall the project: pip install -e .)")
    return next(iter(found)).load()


def build(name: str, settings: Settings) -> Bus:
    bus = Bus(settings, name)
    store = ArtifactStore(settings)
    registrar(name)(bus, store)
    return bus


async def serve_until_stopped(name: str, settings: Settings) -> None:
    """Run service ``name`` until a stop signal; in-flight work finishes (graceful timeout) first."""
    setup_logging(name, settings.log_level)
    bus = build(name, settings)
    start_exporter(settings)  # before serving: Prometheus sees the first deliveries
    store = ArtifactStore(settings)
    await asyncio.to_thread(store.ensure_bucket)
    await asyncio.to_thread(import_modules, PRELOAD.get(name, ()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await bus.broker.start()
    log.info("service started", extra={"nats": settings.nats_url.split("@")[-1], "s3": settings.s3_endpoint,
                                       "prefix": settings.subject_prefix, "metrics_port": settings.metrics_port})
    await stop.wait()
    log.info("stopping: finishing or returning in-flight work")
    bus.stopping.set()
    await bus.broker.stop()


def import_modules(modules: tuple[str, ...]) -> None:
    """Import ``modules`` (see :data:`PRELOAD`); one that fails to import fails again, with its error, where it
    is used."""
    began = time.monotonic()
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:
            log.warning("preload failed", extra={"library": module, "error": str(err)})
    if modules:
        log.info("libraries preloaded", extra={"modules": list(modules), "seconds": round(time.monotonic() - began, 2)})


def run(name: str, settings: Settings | None = None) -> None:
    # services log structured lines only: no progress bars from datasets / transformers / tqdm
    for var in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(var, "1")
    # several torch processes share the CPUs: spinning OpenMP threads would slow them all (measured ~10x)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    asyncio.run(serve_until_stopped(name, settings or Settings()))
