"""The bus adapter against a real nats-server: dedup, redelivery, dead letters, shared work queue."""

import asyncio
import json

import nats
import pytest

from llamaduo.bus.broker import Bus, Delivery, PermanentError
from llamaduo.contracts.events import Subject, TrainRequest, TrainRequestEvent, start_envelope

FAST = Delivery(max_deliver=3, ack_wait=5, backoff=(0.05,))


async def wait_until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def request(rows: int, key: str = ""):
    return start_envelope("m-bus", {}).follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=rows), key=key)


async def dead_letters(settings, nc):
    js = nc.jetstream()
    sub = await js.subscribe(settings.subject("dlq.>"), stream=settings.stream_name, ordered_consumer=True)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1.0)
            out.append(json.loads(msg.data))
    except nats.errors.TimeoutError:
        return out


async def test_duplicate_publish_is_dropped_and_poison_goes_to_dead_letter(settings):
    bus = Bus(settings, "test")
    seen: list[int] = []

    @bus.consumer(Subject.TRAIN_REQUEST, "worker", FAST)
    async def handle(event: TrainRequestEvent) -> None:
        seen.append(event.payload.rows)

    async with bus.broker:
        await bus.broker.start()
        env = request(1, key="same")
        await bus.emit(env)
        await bus.emit(env)  # same event id: JetStream drops it
        nc = await nats.connect(settings.nats_url)
        js = nc.jetstream()
        await js.publish(settings.subject("train.request"), b"{not json", headers={"Nats-Msg-Id": "p1"})
        await js.publish(settings.subject("train.request"), b'{"event_id": "x"}', headers={"Nats-Msg-Id": "p2"})
        await bus.emit(request(2))  # the consumer keeps going after poison
        await wait_until(lambda: seen == [1, 2])
        letters = await dead_letters(settings, nc)
        await nc.close()
    assert len(letters) == 2
    assert all(lt["subject"] == settings.subject("train.request") for lt in letters)
    assert all(lt["reason"].startswith("schema:") for lt in letters)
    assert "correlation_id: Field required" in letters[1]["reason"]  # migration_id is optional (route events)
    assert letters[0]["body"] == "{not json"


async def test_failing_handler_is_retried_then_dead_lettered(settings):
    bus = Bus(settings, "test")
    attempts: dict[int, int] = {}

    @bus.consumer(Subject.TRAIN_REQUEST, "worker", FAST)
    async def handle(event: TrainRequestEvent) -> None:
        rows = event.payload.rows
        attempts[rows] = attempts.get(rows, 0) + 1
        if rows == 1 and attempts[rows] < 2:
            raise RuntimeError("transient")
        if rows == 2:
            raise RuntimeError("always broken")
        if rows == 3:
            raise PermanentError("cannot ever work")

    async with bus.broker:
        await bus.broker.start()
        for rows in (1, 2, 3):
            await bus.emit(request(rows))
        await wait_until(lambda: attempts.get(1) == 2 and attempts.get(2) == FAST.max_deliver)
        nc = await nats.connect(settings.nats_url)
        letters = await dead_letters(settings, nc)
        await nc.close()
    assert attempts[3] == 1
    reasons = sorted(lt["reason"] for lt in letters)
    assert len(letters) == 2
    assert reasons[0].startswith("error after 3 deliveries: RuntimeError: always broken")
    assert reasons[1] == "permanent: cannot ever work"
    assert all(lt["migration_id"] == "m-bus" for lt in letters)


async def test_workers_sharing_a_durable_split_the_work(settings):
    buses = [Bus(settings, f"w{i}") for i in range(2)]
    got: dict[str, list[int]] = {"w0": [], "w1": []}
    def register(bus: Bus) -> None:
        @bus.consumer(Subject.TRAIN_REQUEST, "shared", FAST)
        async def handle(event: TrainRequestEvent) -> None:
            await asyncio.sleep(0.05)
            got[bus.service].append(event.payload.rows)

    for bus in buses:
        register(bus)

    for bus in buses:
        await bus.broker.start()
    try:
        for rows in range(20):
            await buses[0].emit(request(rows))
        await wait_until(lambda: len(got["w0"]) + len(got["w1"]) == 20)
    finally:
        for bus in buses:
            await bus.broker.stop()
    assert sorted(got["w0"] + got["w1"]) == list(range(20))  # each once
    assert got["w0"] and got["w1"]  # both worked


@pytest.mark.parametrize("prefix", ["acme", "acme.eu"])
def test_prefix_namespaces_stream_and_subjects(servers, prefix):
    s = servers.settings(subject_prefix=prefix)
    bus = Bus(s, "x")
    assert bus.stream.name.startswith("ACME")
    assert all(subj.startswith(prefix + ".") for subj in bus.stream.subjects)
