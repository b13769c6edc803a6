"""Prometheus metrics of every service's message handling, defined once, and the ``/metrics`` exporter.

The bus middleware (:mod:`llamaduo.bus.broker`) records them around every handler of every service; a service
process serves them on ``LLAMADUO_METRICS_PORT`` (0, the default: no exporter). Labels stay bounded: the
consumed subject (without the installation's prefix) and an outcome from :data:`OUTCOMES`, never a migration
id. docs/metrics.md lists each metric for dashboards and alerts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from llamaduo.errors import LlamaDuoError
from llamaduo.settings import Settings

log = logging.getLogger("llamaduo.runtime.metrics")

Outcome = Literal["ok", "retried", "dead-lettered", "skipped", "returned"]
#: How a delivery ended: handled and acked; failed, to be redelivered after backoff; sent to ``dlq.<subject>``;
#: acked without (finishing) its work because its migration was cancelled; handed back by a stopping service.
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

#: Work time buckets (seconds): a judge call takes under a second, a training round up to an hour.
WORK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

DELIVERIES = Counter(
    "llamaduo_deliveries", "Messages delivered to a handler, by consumed subject and how the delivery ended",
    ["subject", "outcome"],
)
REDELIVERIES = Counter(
    "llamaduo_redeliveries", "Deliveries JetStream made more than once (its delivery count above 1), by subject",
    ["subject"],
)
DEAD_LETTERS = Counter(
    "llamaduo_dead_letters", "Messages published to dlq.<subject> (invalid, permanent failure or retries "
    "exhausted), by the subject they came from", ["subject"],
)
WORK_SECONDS = Histogram(
    "llamaduo_work_seconds", "Time a handler worked on one delivery, whatever its outcome, by subject",
    ["subject"], buckets=WORK_BUCKETS,
)
IN_FLIGHT = Gauge(
    "llamaduo_handlers_in_flight", "Handlers working on a delivery right now, by subject", ["subject"],
)


class MetricsError(LlamaDuoError, OSError):
    """The ``/metrics`` exporter cannot listen where the settings say (names the address and the fix)."""


def declare_subject(subject: str) -> None:
    """Create every series of ``subject`` at zero, so ``rate()`` and alerts see it before its first event.

    A wildcard (``dlq.>``) is no label: its deliveries are counted under the subjects they arrive on."""
    if "*" in subject or ">" in subject:
        return
    for outcome in OUTCOMES:
        DELIVERIES.labels(subject, outcome)
    REDELIVERIES.labels(subject)
    DEAD_LETTERS.labels(subject)
    WORK_SECONDS.labels(subject)
    IN_FLIGHT.labels(subject)


def delivered(subject: str, outcome: Outcome, delivery_count: int) -> None:
    """Count one delivery of ``subject`` that ended with ``outcome``; ``delivery_count`` is JetStream's."""
    DELIVERIES.labels(subject, outcome).inc()
    if delivery_count > 1:
        REDELIVERIES.labels(subject).inc()


def dead_lettered(subject: str) -> None:
    """Count one message of ``subject`` published to its dead-letter subject."""
    DEAD_LETTERS.labels(subject).inc()


@contextmanager
def working(subject: str) -> Iterator[None]:
    """Around one handler run: in flight meanwhile, its duration observed when it ends (or raises)."""
    with IN_FLIGHT.labels(subject).track_inprogress(), WORK_SECONDS.labels(subject).time():
        yield


def start_exporter(settings: Settings) -> WSGIServer | None:
    """Serve ``/metrics`` (the default registry: these metrics and any a service adds) on the configured host and
    port, from a daemon thread that ends with the process (``shutdown()`` stops it sooner). Returns the server, or
    None when ``metrics_port`` is 0 (no exporter)."""
    if not settings.metrics_port:
        return None
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY)
    except OSError as err:
        raise MetricsError(
            f"cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port}: {err.strerror or err}; "
            "set LLAMADUO_METRICS_PORT to a free port (0 turns the exporter off) or LLAMADUO_METRICS_HOST"
        ) from err
    log.info("metrics exporter started", extra={"host": settings.metrics_host, "port": settings.metrics_port})
    return server
