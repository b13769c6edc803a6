"""Bus path benchmark, on a private nats-server (JetStream, file storage, loopback).

1. Per-event overhead of the project's bus (envelope validation, middleware, dedup header, explicit ack)
   against plain nats-py in the same run: a core request round trip, and a bare JetStream publish ->
   pull-consumer one-way trip. Reported as p50/p99 in milliseconds.
2. Judge fan-out: N judge workers (each its own connection, one shared durable consumer) draining
   judge.request messages whose handling takes 200 ms (the simulated provider latency), for N = 1, 2, 4, 8;
   throughput as a ratio to ideal linear scaling.

Last stdout line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
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

N_LATENCY = 300
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


async def raw_jetstream_one_way(url: str) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAWBENCH", subjects=["rawbench.>"])
    sub = await js.pull_subscribe("rawbench.x", durable="raw")
    out = []
    payload = start_envelope("m-bench", {}).to_bytes()
    for i in range(N_LATENCY):
        t = time.perf_counter()
        await js.publish("rawbench.x", payload, headers={"Nats-Msg-Id": f"r{i}"})
        msgs = await sub.fetch(1, timeout=5)
        json.loads(msgs[0].data)
        await msgs[0].ack()
        out.append((time.perf_counter() - t) * 1000)
    await nc.close()
    return out


def judge_request(i: int) -> JudgeRequestEvent:
    item = JudgeItem(item_id=f"i{i}", instruction="route this", reference="billing", candidate="billing")
    return start_envelope("m-bench", {}).follow(Subject.JUDGE_REQUEST,
                                                JudgeRequest(batch=i, batches=10_000, items=[item]))


async def project_one_way(settings: Settings) -> list[float]:
    bus = Bus(settings, "bench")
    arrived: asyncio.Queue[float] = asyncio.Queue()

    @bus.consumer(Subject.JUDGE_REQUEST, "latency", Delivery())
    async def handle(event: JudgeRequestEvent) -> None:
        arrived.put_nowait(time.perf_counter())

    await bus.broker.start()
    out = []
    for i in range(N_LATENCY):
        t = time.perf_counter()
        await bus.emit(judge_request(i))
        out.append((await asyncio.wait_for(arrived.get(), 5) - t) * 1000)
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
            settings = Settings(nats_url=server.url, subject_prefix="lat")
            rtt = await raw_request_rtt(server.url)
            raw_js = await raw_jetstream_one_way(server.url)
            ours = await project_one_way(settings)
            results: dict[str, float] = {
                "raw_request_rtt_p50_ms": statistics.median(rtt), "raw_request_rtt_p99_ms": pct(rtt, 0.99),
                "raw_jetstream_p50_ms": statistics.median(raw_js), "raw_jetstream_p99_ms": pct(raw_js, 0.99),
                "project_event_p50_ms": statistics.median(ours), "project_event_p99_ms": pct(ours, 0.99),
            }
            results["overhead_p50_ms"] = results["project_event_p50_ms"] - results["raw_jetstream_p50_ms"]
            results["overhead_p99_ms"] = results["project_event_p99_ms"] - results["raw_jetstream_p99_ms"]
            results["overhead_vs_request_rtt_p50_ms"] = results["project_event_p50_ms"] - results[
                "raw_request_rtt_p50_ms"]
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
