"""Client side of an installation: start a migration, follow its events, read its state.

Uses plain nats-py (no service code), like any other client of the published contract would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llamaduo.bus.broker import make_stream
from llamaduo.bus.connection import connect
from llamaduo.contracts.events import Envelope, Subject, parse_event, start_envelope
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.settings import Settings
from llamaduo.storage.keys import migration_key
from llamaduo.storage.store import ArtifactStore

TERMINAL = (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED)


def upload_dataset(store: ArtifactStore, migration_id: str, spec: MigrationSpec) -> MigrationSpec:
    """Put a local coverage file into the store and point the spec at it, so every service can read it."""
    source = spec.dataset.source
    if "://" in source or source.startswith(("hf:", "package:")):
        return spec
    path = Path(source)
    store.ensure_bucket()
    key = migration_key(migration_id, "upload", "coverage" + path.suffix)
    store.put_file(key, path)
    dataset = spec.dataset.model_copy(update={"source": f"s3://{store.bucket}/{key}"})
    return spec.model_copy(update={"dataset": dataset})


async def ensure_stream(js: Any, settings: Settings) -> None:
    """Create the stream if no service has yet (a client may start first)."""
    from nats.js.api import StorageType, StreamConfig

    cfg = make_stream(settings).config
    try:
        await js.stream_info(settings.stream_name)
    except Exception:
        await js.add_stream(StreamConfig(name=settings.stream_name, subjects=cfg.subjects,
                                         storage=StorageType.FILE, duplicate_window=cfg.duplicate_window))


async def wait_ready(settings: Settings, timeout: float = 120.0) -> None:
    """Wait until the controller's start consumer exists, i.e. the installation can take a migration."""
    nc = await connect(settings)
    durable = f"{settings.stream_name}_controller-start"
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await js.consumer_info(settings.stream_name, durable)
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"the controller did not come up within {timeout:.0f}s") from None
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def publish_start(settings: Settings, migration_id: str, spec: MigrationSpec) -> Envelope:
    """Publish ``migration.start``; retried briefly while the stream is being (re)declared."""
    from nats.js.errors import NoStreamResponseError

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        env = start_envelope(migration_id, spec.model_dump(mode="json"))
        for attempt in range(20):
            try:
                await js.publish(settings.subject(Subject.MIGRATION_START), env.to_bytes(),
                                 headers={"Nats-Msg-Id": env.event_id})
                return env
            except NoStreamResponseError:
                if attempt == 19:
                    raise ConnectionError(f"no JetStream stream answers on {settings.stream_name}") from None
                await asyncio.sleep(0.5)
        return env
    finally:
        await nc.close()


async def follow(settings: Settings, migration_id: str | None = None, *, live: bool = True) -> AsyncIterator[Envelope]:
    """Yield the events of one migration (or all) in stream order.

    ``live``: keep waiting for new events (ending after the migration's terminal event when an id is
    given); otherwise stop once the events stored when the call started have been read.
    """
    from nats.js.api import DeliverPolicy

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        last = (await js.stream_info(settings.stream_name)).state.last_seq
        if not live and last == 0:
            return
        sub = await js.subscribe(settings.subject(">") if settings.subject_prefix else ">",
                                 stream=settings.stream_name, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        while True:
            try:
                msg = await sub.next_msg(timeout=3600)
            except TimeoutError:
                continue
            caught_up = msg.metadata.sequence.stream >= last
            try:
                env = parse_event(msg.data)
            except Exception:
                env = None  # dead letters and foreign messages are not migration events
            if env is not None and (not migration_id or env.migration_id == migration_id):
                yield env
                if live and migration_id and env.type in TERMINAL:
                    return
            if not live and caught_up:
                return
    finally:
        await nc.close()


async def list_states(settings: Settings, migration_id: str | None = None) -> list[dict[str, Any]]:
    """Controller states from the KV bucket (what ``llamaduo status`` shows)."""
    nc = await connect(settings)
    try:
        kv = await nc.jetstream().key_value(settings.kv_bucket)
        keys = [migration_id] if migration_id else await kv.keys()
        out = []
        for key in keys:
            entry = await kv.get(key)
            if entry.value:
                out.append(json.loads(entry.value))
        return out
    except Exception as err:
        if "not found" in str(err).lower() or "no keys" in str(err).lower():
            return []
        raise
    finally:
        await nc.close()
