"""Client side of an installation: start a migration, follow its events, read its state.

Uses plain nats-py (no service code), like any other client of the published contract would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, NoStreamResponseError, NotFoundError

from llamaduo.bus.connection import connect
from llamaduo.bus.topology import CONTROLLER_START, durable_name, stream_config
from llamaduo.contracts.events import TERMINAL_SUBJECTS, Envelope, cancel_envelope, parse_event, start_envelope
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.contracts.state import MigrationState
from llamaduo.errors import BusError
from llamaduo.settings import Settings
from llamaduo.storage.keys import migration_key
from llamaduo.storage.store import ArtifactStore

TERMINAL = TERMINAL_SUBJECTS


def upload_dataset(store: ArtifactStore, migration_id: str, spec: MigrationSpec) -> MigrationSpec:
    """Put a local coverage file into the store and point the spec at it, so every service can read it.
    Other sources (s3://, hf:, package:, traffic:<route>) are read where they are: the spec is returned as is."""
    source = spec.dataset.source
    if "://" in source or source.startswith(("hf:", "package:")) or spec.dataset.traffic_route is not None:
        return spec  # read where it is (traffic:<route>: by the controller, from the captured batches)
    path = Path(source)
    store.ensure_bucket()
    key = migration_key(migration_id, "upload", "coverage" + path.suffix)
    store.put_file(key, path)
    dataset = spec.dataset.model_copy(update={"source": f"s3://{store.bucket}/{key}"})
    return spec.model_copy(update={"dataset": dataset})


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the stream if no service has yet (a client may start first), as the services declare it."""
    try:
        await js.stream_info(settings.stream_name)
    except NotFoundError:
        await js.add_stream(stream_config(settings))


async def wait_ready(settings: Settings, timeout: float = 120.0) -> None:
    """Wait until the controller's start consumer exists, i.e. the installation can take a migration.

    Raises ``TimeoutError`` when it does not appear within ``timeout`` seconds.
    """
    nc = await connect(settings)
    durable = durable_name(settings, CONTROLLER_START)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await js.consumer_info(settings.stream_name, durable)
                return
            except (NotFoundError, NatsTimeoutError):  # no stream or consumer yet, or a busy server
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"the controller did not come up within {timeout:.0f}s (no consumer "
                                       f"{durable} on stream {settings.stream_name})") from None
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _publish(settings: Settings, env: Envelope) -> Envelope:
    """Publish one envelope (the installation's prefix added, its event id as ``Nats-Msg-Id``); retried
    briefly while the stream is being (re)declared."""
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        for attempt in range(20):
            try:
                await js.publish(settings.subject(env.type), env.to_bytes(), headers={"Nats-Msg-Id": env.event_id})
                return env
            except NoStreamResponseError:
                if attempt == 19:
                    raise BusError(f"no JetStream stream answers on {settings.stream_name}") from None
                await asyncio.sleep(0.5)
        return env
    finally:
        await nc.close()


async def publish_start(settings: Settings, migration_id: str, spec: MigrationSpec) -> Envelope:
    """Publish ``migration.start``; retried briefly while the stream is being (re)declared."""
    return await _publish(settings, start_envelope(migration_id, spec.model_dump(mode="json")))


async def publish_cancel(settings: Settings, state: MigrationState, reason: str = "",
                         requested_by: str = "") -> Envelope:
    """Publish ``migration.cancel`` for the migration whose controller state is ``state`` (its correlation id
    goes on the command). The controller ends it as ``cancelled``; publishing it twice is harmless."""
    return await _publish(settings, cancel_envelope(state.migration_id, state.correlation_id, reason, requested_by))


async def follow(settings: Settings, migration_id: str | None = None, *, live: bool = True) -> AsyncIterator[Envelope]:
    """Yield the events of one migration (or all) in stream order.

    ``live``: keep waiting for new events (ending after the migration's terminal event when an id is
    given); otherwise stop once the events stored when the call started have been read.
    """
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
            except ValueError:
                env = None  # dead letters and foreign messages are not migration events
            if env is not None and (not migration_id or env.migration_id == migration_id):
                yield env
                if live and migration_id and env.type in TERMINAL:
                    return
            if not live and caught_up:
                return
    finally:
        await nc.close()


async def list_states(settings: Settings, migration_id: str | None = None) -> list[MigrationState]:
    """Controller states from the KV bucket (what ``llamaduo status`` shows): all of them, or the one of
    ``migration_id``; empty when there is none (no migration has started yet, or no such id)."""
    nc = await connect(settings)
    try:
        try:
            kv = await nc.jetstream().key_value(settings.kv_bucket)
            keys = [migration_id] if migration_id else await kv.keys()
        except (BucketNotFoundError, NoKeysError):
            return []
        out = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # no such migration, or deleted since it was listed
                continue
            if entry.value:
                out.append(MigrationState.model_validate_json(entry.value))
        return out
    finally:
        await nc.close()
