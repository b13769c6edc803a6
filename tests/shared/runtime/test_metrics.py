"""Every service's Prometheus metrics, scraped over HTTP from the real exporter after real deliveries
through a real nats-server: outcomes, redeliveries, dead letters, work time, handlers in flight."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.contracts.events import Subject, TrainRequest, TrainRequestEvent, start_envelope
from llamaduo.runtime.local_servers import free_port
from llamaduo.runtime.metrics import MetricsError, start_exporter
from llamaduo.settings import Settings
from tests.shared.bus.test_broker_integration import wait_until
from tests.shared.runtime.test_service import service_env

FAST = Delivery(max_deliver=3, ack_wait=5, backoff=(0.05,))
Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(port: int) -> dict[Sample, float]:
    """``/metrics`` over HTTP, parsed: ``{(sample name, sorted labels): value}`` of the ``llamaduo_`` samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("llamaduo_")
            for s in family.samples}


def delta(after: dict[Sample, float], before: dict[Sample, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, f"{key} not exported"
    return after[key] - before.get(key, 0.0)


@pytest.fixture
def exporter(settings: Settings) -> Iterator[int]:
    port = free_port()
    server = start_exporter(settings.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"}))
    assert isinstance(server, WSGIServer)
    yield port
    server.shutdown()
    server.server_close()


def request(rows: int, migration_id: str = "m-metrics"):
    return start_envelope(migration_id, {}).follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=rows))


async def test_deliveries_are_counted_by_outcome_and_timed(settings: Settings, exporter: int) -> None:
    """rows 1 works; rows 2 fails once, then works; rows 3 always fails (dead-lettered on its 3rd delivery);
    rows 4 belongs to a cancelled migration (skipped); rows 5 is held in flight while /metrics is scraped."""
    bus = Bus(settings, "test")
    attempts: dict[int, int] = {}
    release = asyncio.Event()

    @bus.consumer(Subject.TRAIN_REQUEST, "worker", FAST, max_workers=2)
    async def handle(event: TrainRequestEvent) -> None:
        rows = event.payload.rows
        attempts[rows] = attempts.get(rows, 0) + 1
        if (rows == 2 and attempts[rows] == 1) or rows == 3:
            raise RuntimeError("broken")
        if rows == 5:
            await asyncio.wait_for(release.wait(), 20)

    before = await asyncio.to_thread(scrape, exporter)
    async with bus.broker:
        await bus.broker.start()
        await bus.cancelled.mark("m-cancelled", {"reason": "test"})
        for rows in (1, 2, 3):
            await bus.emit(request(rows))
        # published as another service did before the cancel (this bus no longer emits for that migration)
        nc = await nats.connect(settings.nats_url)
        await nc.jetstream().publish(settings.subject(Subject.TRAIN_REQUEST), request(4, "m-cancelled").to_bytes())
        await nc.close()
        await wait_until(lambda: delta(scrape(exporter), before, "llamaduo_deliveries_total",
                                       subject="train.request", outcome="dead-lettered") == 1, timeout=20)
        await bus.emit(request(5))
        await wait_until(lambda: 5 in attempts)
        during = await asyncio.to_thread(scrape, exporter)
        release.set()
        await wait_until(lambda: scrape(exporter)[
            ("llamaduo_handlers_in_flight", (("subject", "train.request"),))] == 0)
        after = await asyncio.to_thread(scrape, exporter)

    assert delta(during, before, "llamaduo_handlers_in_flight", subject="train.request") == 1
    outcomes = {outcome: delta(after, before, "llamaduo_deliveries_total", subject="train.request", outcome=outcome)
                for outcome in ("ok", "retried", "dead-lettered", "skipped", "returned")}
    assert outcomes == {"ok": 3, "retried": 3, "dead-lettered": 1, "skipped": 1, "returned": 0}
    assert delta(after, before, "llamaduo_redeliveries_total", subject="train.request") == 3  # rows 2 once, 3 twice
    assert delta(after, before, "llamaduo_dead_letters_total", subject="train.request") == 1
    assert delta(after, before, "llamaduo_work_seconds_count", subject="train.request") == 7  # the skipped one: no work
    assert delta(after, before, "llamaduo_work_seconds_bucket", subject="train.request", le="+Inf") == 7
    assert 0 < delta(after, before, "llamaduo_work_seconds_sum", subject="train.request") < 60
    # labels stay bounded: no migration id anywhere, the installation's prefix stripped from subjects
    labels = {value for _, pairs in after for _, value in pairs}
    assert not any("m-metrics" in v or "m-cancelled" in v or settings.subject_prefix in v for v in labels)


def test_no_exporter_unless_a_port_is_set() -> None:
    assert Settings.model_fields["metrics_port"].default == 0
    assert start_exporter(Settings(metrics_port=0)) is None


def test_a_port_in_use_names_the_setting(settings: Settings, exporter: int) -> None:
    taken = settings.model_copy(update={"metrics_port": exporter, "metrics_host": "127.0.0.1"})
    with pytest.raises(MetricsError, match=rf"127\.0\.0\.1:{exporter}.*LLAMADUO_METRICS_PORT"):
        start_exporter(taken)


def test_a_service_started_with_the_port_set_serves_metrics(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = {**service_env(settings, tmp_path), "LLAMADUO_METRICS_PORT": str(port), "LLAMADUO_METRICS_HOST": "127.0.0.1"}
    log_path = tmp_path / "judge.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "service", "judge"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"service started" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the judge did not start within 60 s"
            time.sleep(0.1)
        samples = scrape(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # the judge's consumer is declared at zero before any event: Prometheus sees the series from the start
    for outcome in ("ok", "retried", "dead-lettered", "skipped", "returned"):
        assert samples[("llamaduo_deliveries_total", (("outcome", outcome), ("subject", "judge.request")))] == 0
    assert samples[("llamaduo_handlers_in_flight", (("subject", "judge.request"),))] == 0
