"""Replica counts: the stream and every KV bucket of an installation are created with ``LLAMADUO_NATS_REPLICAS``
replicas (checked on a real three-node JetStream cluster), and no code creates a bucket past the one helper."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from llamaduo.bus.broker import Bus
from llamaduo.bus.client import ensure_stream
from llamaduo.bus.topology import (
    cancelled_bucket,
    open_bucket,
    rate_limit_bucket,
    routes_bucket,
    shadow_bucket,
    stream_config,
)
from llamaduo.cli.routes import open_routes
from llamaduo.contracts.spec import ProviderSpec
from llamaduo.providers.budget import kv_ledger, spend_bucket
from llamaduo.providers.shared_limits import shared_limiter
from llamaduo.runtime.local_servers import NatsCluster
from llamaduo.services.controller.app import StateStore
from llamaduo.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def test_replicas_default_to_one_and_reach_the_stream_definition() -> None:
    assert Settings().nats_replicas == 1
    assert stream_config(Settings(nats_replicas=3)).num_replicas == 3
    with pytest.raises(ValueError):
        Settings(nats_replicas=0)


def test_no_bucket_is_created_past_open_bucket() -> None:
    """Every bucket goes through :func:`llamaduo.bus.topology.open_bucket`, so it gets the configured replicas."""
    creating = re.compile(r"create_key_value\(|broker\.key_value\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}"
                 for folder in ("shared", "services") for path in sorted((ROOT / folder).rglob("*.py"))
                 if path != ROOT / "shared" / "bus" / "topology.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if creating.search(line)]
    assert offenders == []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


def test_stream_and_every_bucket_have_the_configured_replicas(cluster: NatsCluster, tmp_path: Path) -> None:
    settings = Settings(nats_url=cluster.url, nats_replicas=3, subject_prefix="rep", work_dir=tmp_path)

    async def main() -> dict[str, int]:
        bus = Bus(settings, "replicas")

        @bus.consumer("train.request", "replicas")
        async def handle(body: bytes) -> None:  # pragma: no cover - never sent
            pass

        await bus.broker.start()  # declares the stream, as every service does
        try:
            await bus.cancelled.start()
            await kv_ledger(bus, "m-1")
            await StateStore(bus).kv()
            await shared_limiter(bus, ProviderSpec(provider="openai", model="gpt-4o",
                                                   limits={"requests_per_minute": 60}))
            await open_bucket(bus.broker, settings, shadow_bucket(settings.stream_name))
        finally:
            await bus.broker.stop()
        nc, _ = await open_routes(settings)  # the CLI's plain nats-py path
        await nc.close()

        nc = await nats.connect(cluster.url.split(","))
        try:
            js = nc.jetstream()
            await ensure_stream(js, settings)  # exists: left as the services declared it
            return {info.config.name: info.config.num_replicas for info in await js.streams_info()}
        finally:
            await nc.close()

    replicas = asyncio.run(main())
    expected = {settings.stream_name, *(f"KV_{b}" for b in (
        cancelled_bucket(settings), spend_bucket(settings.stream_name), settings.kv_bucket,
        rate_limit_bucket(settings), shadow_bucket(settings.stream_name), routes_bucket(settings.stream_name)))}
    assert expected <= set(replicas), replicas
    assert {name: n for name, n in replicas.items() if name in expected} == dict.fromkeys(expected, 3)
