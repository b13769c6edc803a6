"""Bus helpers for tests over a real nats-server: an event recorder, a running controller, a round trip."""

from __future__ import annotations

import asyncio
import contextlib

import nats

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, TrainRequest, TrainRequestEvent, parse_event, start_envelope
from llamaduo.services.controller.app import register
from llamaduo.settings import Settings
from llamaduo.storage.store import ArtifactStore


class Recorder:
    """A plain nats-py subscriber collecting every event of the installation (by prefix)."""

    def __init__(self, settings):
        self.settings = settings
        self.events: list = []
        self.raw: list = []

    async def __aenter__(self):
        self.nc = await nats.connect(self.settings.nats_url)
        await self.nc.subscribe(self.settings.subject(">"), cb=self._on)
        return self

    async def _on(self, msg):
        self.raw.append((msg.subject, msg.data))
        with contextlib.suppress(Exception):
            self.events.append(parse_event(msg.data))

    async def __aexit__(self, *exc):
        await self.nc.close()

    def of(self, type_, round=None):
        return [e for e in self.events if e.type == type_ and (round is None or e.round == round)]

    async def wait_for(self, type_, round=None, count=1, timeout=15.0):
        for _ in range(int(timeout / 0.05)):
            if len(self.of(type_, round)) >= count:
                return self.of(type_, round)
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {type_} (round {round}) within {timeout}s; saw {[e.type for e in self.events]}")


async def controller(settings) -> Bus:
    bus = Bus(settings, "controller")
    register(bus, ArtifactStore(settings))
    await bus.broker.start()
    return bus


async def carries_an_event(settings: Settings) -> list[int]:
    bus = Bus(settings, "auth")
    got: list[int] = []

    @bus.consumer(Subject.TRAIN_REQUEST, "auth")
    async def handle(event: TrainRequestEvent) -> None:
        got.append(event.payload.rows)

    await bus.broker.start()
    try:
        await bus.emit(start_envelope("m-auth", {}).follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=7)))
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.05)
    finally:
        await bus.broker.stop()
    return got


async def stored_events(settings: Settings) -> list:
    """Every event in the installation's stream, in stream order (dead letters left out). Connects like the
    services do (``LLAMADUO_NATS_URL`` may list several cluster nodes)."""
    from llamaduo.bus.connection import connect

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(settings.stream_name)).state.last_seq
        sub = await js.subscribe(">", stream=settings.stream_name, ordered_consumer=True)
        out = []
        while True:
            msg = await sub.next_msg(timeout=10)
            if not msg.subject.startswith("dlq."):
                out.append(parse_event(msg.data))
            if msg.metadata.sequence.stream >= last:
                return out
    finally:
        await nc.close()
