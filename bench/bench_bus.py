"""Bus path benchmark, on a private nats-server (JetStream, file storage, loopback).

1. Per-event overhead of the project's bus (envelope validation, middleware, dedup header, explicit ack)
   against plain nats-py in the same run, measured the same way on both paths: a pull request is already
   waiting on a durable pull consumer (batch 1), the clock starts before the publish (which waits for the
   JetStream PubAck) and stops when the consumer's ``ack()`` has returned, after parsing the JSON body. The two
   paths alternate in blocks (``BLOCKS`` x ``N_LATENCY`` events each) so drift on a shared machine hits both;
   p50/p99 over all events, plus the p50 of each block. A core request round trip is given for reference.
2. Judge fan-out: N judge workers (each its own connection, one shared durable consumer) draining
   judge.request messages whose handling takes 200 ms (the simulated provider latency), for N = 1, 2, 4, 8;
   throughput as a ratio to ideal linear scaling.

Last stdout line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.contracts.events import JudgeItem, JudgeRequest, JudgeRequestEvent, Subject, start_envelope
from llamaduo.runtime.local_servers import NatsServer
from llamaduo.settings import Settings

N_LATENCY = 200
BLOCKS = 3
PROVIDER_LATENCY_S = 0.2
FANOUT_MESSAGES_PER_WORKER = 12


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def raw_request_rtt(url: str) -> list[float]:
    nc = await nats.connect(url)

    async def echo(msg):  # type: ignore[no-untyped-def]
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    out = []
    for _ in range(N_LATENCY):
        t = time.perf_counter()
        await nc.request("bench.echo", b"x" * 200, timeout=5)
        out.append((time.perf_counter() - t) * 1000)
    await nc.close()
    return out


async def raw_jetstream_one_way(url: str, block: int) -> list[float]:
    """Plain nats-py: a task keeps one pull request waiting (fetch of 1), parses and acks each message."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=f"RAWBENCH{block}", subjects=[f"rawbench{block}.>"])  # a fresh stream per block
    sub = await js.pull_subscribe(f"rawbench{block}.x", durable="raw")
    acked: asyncio.Queue[float] = asyncio.Queue()

    async def consume() -> None:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                json.loads(msg.data)
                await msg.ack()
                acked.put_nowait(time.perf_counter())

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)  # the first pull request is waiting
    out = []
    payload = start_envelope("m-bench", {}).to_bytes()
    for i in range(N_LATENCY):
        t = time.perf_counter()
        await js.publish(f"rawbench{block}.x", payload, headers={"Nats-Msg-Id": f"r{block}-{i}"})
        out.append((await asyncio.wait_for(acked.get(), 5) - t) * 1000)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    await nc.close()
    return out


def judge_request(i: int) -> JudgeRequestEvent:
    item = JudgeItem(item_id=f"i{i}", instruction="route this", reference="billing", candidate="billing")
    return start_envelope("m-bench", {}).follow(Subject.JUDGE_REQUEST,
                                                JudgeRequest(batch=i, batches=10_000, items=[item]))


class TimedBus(Bus):
    """The project's bus with one change: the time is taken when the middleware's ``ack()`` has returned."""

    acked: asyncio.Queue[float]

    def _middleware(self):  # type: ignore[no-untyped-def]
        reliable = super()._middleware()
        bus = self

        class Timed(reliable):  # type: ignore[misc,valid-type]
            async def consume_scope(self, call_next, msg):  # type: ignore[no-untyped-def]
                result = await super().consume_scope(call_next, msg)
                bus.acked.put_nowait(time.perf_counter())
                return result

        return Timed


async def project_one_way(settings: Settings, block: int) -> list[float]:
    bus = TimedBus(settings, "bench")
    bus.acked = asyncio.Queue()

    @bus.consumer(Subject.JUDGE_REQUEST, f"latency{block}", Delivery())
    async def handle(event: JudgeRequestEvent) -> None:
        pass

    await bus.broker.start()
    await asyncio.sleep(0.2)  # the first pull request is waiting
    out = []
    for i in range(N_LATENCY):
        t = time.perf_counter()
        await bus.emit(judge_request(block * N_LATENCY + i))
        out.append((await asyncio.wait_for(bus.acked.get(), 5) - t) * 1000)
    await bus.broker.stop()
    return out


async def fanout(url: str, workers: int) -> float:
    settings = Settings(nats_url=url, subject_prefix=f"fan{workers}")
    done: list[float] = []
    buses = []
    for w in range(workers):
        bus = Bus(settings, f"judge-{w}")

        @bus.consumer(Subject.JUDGE_REQUEST, "judge", Delivery(ack_wait=30))
        async def handle(event: JudgeRequestEvent) -> None:
            await asyncio.sleep(PROVIDER_LATENCY_S)  # one provider call
            done.append(time.perf_counter())

        buses.append(bus)
    for bus in buses:
        await bus.broker.start()
    total = FANOUT_MESSAGES_PER_WORKER * workers
    await asyncio.sleep(0.5)
    t = time.perf_counter()
    for i in range(total):
        await buses[0].emit(judge_request(i))
    while len(done) < total:
        await asyncio.sleep(0.01)
    elapsed = max(done) - t
    for bus in buses:
        await bus.broker.stop()
    return total / elapsed


async def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            rtt = await raw_request_rtt(server.url)
            raw_js: list[float] = []
            ours: list[float] = []
            results: dict[str, float] = {}
            for block in range(BLOCKS):  # alternate the two paths; a fresh consumer (and prefix) per block
                raw_block = await raw_jetstream_one_way(server.url, block)
                settings = Settings(nats_url=server.url, subject_prefix=f"lat{block}")
                ours_block = await project_one_way(settings, block)
                results[f"block{block}_raw_jetstream_p50_ms"] = statistics.median(raw_block)
                results[f"block{block}_project_event_p50_ms"] = statistics.median(ours_block)
                raw_js += raw_block
                ours += ours_block
            results |= {
                "raw_request_rtt_p50_ms": statistics.median(rtt), "raw_request_rtt_p99_ms": pct(rtt, 0.99),
                "raw_jetstream_p50_ms": statistics.median(raw_js), "raw_jetstream_p99_ms": pct(raw_js, 0.99),
                "project_event_p50_ms": statistics.median(ours), "project_event_p99_ms": pct(ours, 0.99),
            }
            results["overhead_p50_ms"] = results["project_event_p50_ms"] - results["raw_jetstream_p50_ms"]
            results["overhead_p99_ms"] = results["project_event_p99_ms"] - results["raw_jetstream_p99_ms"]
            results["ratio_p50_project_vs_raw"] = results["project_event_p50_ms"] / results["raw_jetstream_p50_ms"]
            base = None
            for n in (1, 2, 4, 8):
                thr = await fanout(server.url, n)
                base = base or thr
                results[f"judge_{n}w_msgs_per_s"] = thr
                results[f"judge_{n}w_vs_ideal"] = thr / (base * n)
            results["ideal_1w_msgs_per_s"] = 1 / PROVIDER_LATENCY_S
        finally:
            server.stop()
    return {k: round(v, 3) for k, v in results.items()}


if __name__ == "__main__":
    figures = asyncio.run(main())
    for k, v in figures.items():
        print(f"{k:34s} {v}", file=sys.stderr)
    print(json.dumps(figures))
