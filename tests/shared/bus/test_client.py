"""The plain nats-py client against a real nats-server and S3 server, with no service running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from support.specs import triage_spec

from llamaduo.bus.client import follow, list_states, publish_start, upload_dataset, wait_ready
from llamaduo.bus.connection import connect
from llamaduo.bus.topology import CONTROLLER_START, durable_name
from llamaduo.contracts.events import Stage, Subject, TrainRequest, start_envelope
from llamaduo.contracts.spec import MigrationSpec, parse_spec
from llamaduo.contracts.state import MigrationState
from llamaduo.errors import BusError
from llamaduo.settings import Settings
from llamaduo.storage.keys import migration_key
from llamaduo.storage.store import ArtifactStore


def spec(source: str) -> MigrationSpec:
    return parse_spec(triage_spec(Path(source)) | {"dataset": {"source": source}})


async def test_publish_start_twice_stores_one_start_on_a_stream_it_creates(settings: Settings) -> None:
    first = await publish_start(settings, "m-twice", spec("package:llamaduo.tasks/data/invoice.jsonl"))
    again = await publish_start(settings, "m-twice", spec("package:llamaduo.tasks/data/invoice.jsonl"))
    assert first.event_id == again.event_id
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jetstream().stream_info(settings.stream_name)
        msg = await nc.jetstream().get_last_msg(settings.stream_name, settings.subject(Subject.MIGRATION_START))
    finally:
        await nc.close()
    assert info.state.messages == 1
    assert set(info.config.subjects or []) >= {settings.subject("migration.>"), settings.subject("dlq.>")}
    assert msg.headers and msg.headers["Nats-Msg-Id"] == first.event_id


async def test_follow_without_live_stops_once_caught_up(settings: Settings) -> None:
    assert [e async for e in follow(settings, live=False)] == []  # nothing stored yet
    start = await publish_start(settings, "m-follow", spec("package:llamaduo.tasks/data/invoice.jsonl"))
    other = start_envelope("m-other", {})
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        train = start.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=3))
        for env in (train, other):
            await js.publish(settings.subject(env.type), env.to_bytes(), headers={"Nats-Msg-Id": env.event_id})
    finally:
        await nc.close()

    async def read(migration_id: str | None) -> list[str]:
        return [e.event_id async for e in follow(settings, migration_id, live=False)]

    assert await asyncio.wait_for(read(None), 20) == [start.event_id, train.event_id, other.event_id]
    assert await asyncio.wait_for(read("m-follow"), 20) == [start.event_id, train.event_id]


async def test_list_states_without_bucket_keys_or_id_is_empty(settings: Settings) -> None:
    assert await list_states(settings) == []  # no controller ever ran: no bucket
    nc = await nats.connect(settings.nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket=settings.kv_bucket)
        assert await list_states(settings) == []  # a bucket with no keys
        state = MigrationState(migration_id="m-state", correlation_id="c", spec={}, stage=Stage.TRAINING)
        await kv.put(state.migration_id, state.model_dump_json().encode())
        assert await list_states(settings) == [state]
        assert await list_states(settings, "m-state") == [state]
        assert await list_states(settings, "m-nothing") == []
    finally:
        await nc.close()


async def test_wait_ready_waits_for_the_controller_start_consumer(settings: Settings) -> None:
    with pytest.raises(TimeoutError, match="controller did not come up within 1s"):
        await wait_ready(settings, timeout=1)
    await publish_start(settings, "m-ready", spec("package:llamaduo.tasks/data/invoice.jsonl"))  # the stream
    nc = await nats.connect(settings.nats_url)
    try:
        await nc.jetstream().add_consumer(settings.stream_name, durable_name=durable_name(settings, CONTROLLER_START))
    finally:
        await nc.close()
    await asyncio.wait_for(wait_ready(settings, timeout=5), 10)


def test_upload_dataset_rewrites_a_local_source_to_the_store(store: ArtifactStore, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    uploaded = upload_dataset(store, "m-up", spec(str(data)))
    key = migration_key("m-up", "upload", "coverage.jsonl")
    assert uploaded.dataset.source == f"s3://{store.bucket}/{key}"
    assert store.get_bytes(key) == data.read_bytes()
    packaged = spec("package:llamaduo.tasks/data/invoice.jsonl")
    assert upload_dataset(store, "m-up", packaged) is packaged


async def test_unreachable_nats_raises_bus_error(tmp_path: Path) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:9", work_dir=tmp_path)
    with pytest.raises(BusError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:9") as err:
        await connect(settings)
    assert isinstance(err.value, ConnectionError)  # callers catching ConnectionError keep working
