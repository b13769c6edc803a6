"""Cancelled migrations in the bus adapter, over a real nats-server: skipped before their handler runs, work
stopped for a cancel acked (never retried nor dead-lettered), their non-terminal events not published, and a
service started after the cancel knows it."""

import asyncio

import nats
from support.bus import Recorder

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import (
    MigrationFailed,
    MigrationProgress,
    Stage,
    Subject,
    TrainRequest,
    TrainRequestEvent,
    start_envelope,
)
from tests.shared.bus.test_broker_integration import dead_letters, wait_until

FAST = Delivery(max_deliver=3, ack_wait=5, backoff=(0.05,))
#: a retry would come after 30 s: within the test, a failed message of a cancelled migration is acked or pending
LATE_RETRY = Delivery(max_deliver=3, ack_wait=5, backoff=(30.0,))


def request(migration_id: str, rows: int):
    return start_envelope(migration_id, {}).follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=rows))


async def pending(settings, durable: str) -> tuple[int, int]:
    """``(not yet delivered, delivered but not acked)`` of a worker consumer."""
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jetstream().consumer_info(settings.stream_name, f"{settings.stream_name}_{durable}")
        return info.num_pending, info.num_ack_pending
    finally:
        await nc.close()


async def test_messages_of_a_cancelled_migration_are_acked_and_skipped(settings):
    worker, controller = Bus(settings, "worker"), Bus(settings, "controller")
    handled: list[tuple[str, int]] = []

    @worker.consumer(Subject.TRAIN_REQUEST, "worker", LATE_RETRY)
    async def handle(event: TrainRequestEvent) -> None:
        handled.append((event.migration_id, event.payload.rows))
        if event.payload.rows == 3:  # long work that sees the cancel at a safe point
            await controller.cancelled.mark("m-slow", {"reason": "test"})
            await wait_until(lambda: "m-slow" in worker.cancelled)
            raise MigrationCancelled("stopped at a safe point")
        if event.payload.rows == 4:  # a failure of work whose migration was cancelled meanwhile
            await controller.cancelled.mark("m-broken", {})
            await wait_until(lambda: "m-broken" in worker.cancelled)
            raise RuntimeError("the half-done work breaks")

    async with worker.broker, controller.broker:
        await controller.broker.start()
        await worker.broker.start()
        await worker.emit(request("m-live", 1))
        await wait_until(lambda: handled == [("m-live", 1)])  # the worker now watches the bucket

        await controller.cancelled.mark("m-gone", {"reason": "test"})
        await wait_until(lambda: "m-gone" in worker.cancelled)  # a watch, not a read per message
        await controller.emit(request("m-gone", 2))  # published by another service before it knew
        await worker.emit(request("m-live", 5))
        await wait_until(lambda: ("m-live", 5) in handled)
        assert ("m-gone", 2) not in handled

        await worker.emit(request("m-slow", 3))
        await worker.emit(request("m-broken", 4))
        await worker.emit(request("m-live", 6))
        await wait_until(lambda: ("m-live", 6) in handled)
        await asyncio.sleep(0.5)
        assert [h for h in handled if h[0] != "m-live"] == [("m-slow", 3), ("m-broken", 4)]  # each once
        assert await pending(settings, "worker") == (0, 0)  # all acked
        nc = await nats.connect(settings.nats_url)
        assert await dead_letters(settings, nc) == []
        await nc.close()


async def test_a_cancelled_migration_publishes_only_its_terminal_event_and_late_services_know_it(settings):
    controller = Bus(settings, "controller")
    start = start_envelope("m-quiet", {})
    async with Recorder(settings) as rec, controller.broker:
        await controller.broker.start()
        await controller.cancelled.mark("m-quiet", {"reason": "test"})
        await controller.emit(start.follow(Subject.MIGRATION_PROGRESS, MigrationProgress(stage=Stage.TRAINING)))
        await controller.emit(start.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=1)))
        await controller.emit(start.follow(Subject.MIGRATION_FAILED, MigrationFailed(reason="cancelled")))
        await rec.wait_for(Subject.MIGRATION_FAILED)
        await asyncio.sleep(0.3)
        assert [e.type for e in rec.events if e.migration_id == "m-quiet"] == [Subject.MIGRATION_FAILED]

        late = Bus(settings, "late")  # started after the cancel: the watch starts from what is stored
        handled: list[str] = []

        @late.consumer(Subject.TRAIN_REQUEST, "late", FAST)
        async def handle(event: TrainRequestEvent) -> None:
            handled.append(event.migration_id)

        async with late.broker:
            await late.broker.start()
            publisher = Bus(settings, "publisher")
            await publisher.broker.connect()
            await publisher.emit(request("m-quiet", 1))
            await publisher.emit(request("m-other", 1))
            await wait_until(lambda: "m-other" in handled)
            await asyncio.sleep(0.3)
            assert handled == ["m-other"]
            await publisher.broker.stop()
