"""Four judge replicas (real ``llamaduo service judge`` processes on one nats-server) calling one provider account
with ``limits.requests_per_minute: 60``: together they stay within the account's rate.

The fake OpenAI server enforces the account's limit like a provider would (a 429 with ``Retry-After`` for a
request beyond 3 in any 2 s), and records when each request arrived. The judges get far more work than 60 a
minute allows (4 replicas x 8 calls in flight). Over a measured window of 20 s the server must see at most the
rate plus a stated tolerance: 20 requests + 1 (the bucket's burst) + 1 (one request late off its slot, so that
two land closer together). Before the limit was shared, each replica spent the whole allowance: ~4x as many
requests, and a storm of 429s.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import nats
import pytest
from fakes.llm_servers import FakeOpenAIServer, Recorded, Reply

from llamaduo.bus.client import ensure_stream
from llamaduo.bus.topology import durable_name
from llamaduo.contracts.events import JudgeItem, JudgeRequest, Subject, start_envelope
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded
from llamaduo.storage.keys import spec_key
from llamaduo.storage.store import ArtifactStore

pytestmark = pytest.mark.slow

RPM = 60
REPLICAS = 4
WINDOW = 20.0
#: the bucket's burst (1 request) plus one request arriving late off its slot
TOLERANCE = 2
BATCHES, ITEMS = 16, 8  # 128 calls: ~2 minutes of work at the account's rate, far more than the window


class AccountLimit:
    """A responder that answers like a judge, and 429s a request beyond 3 in the trailing 2 s."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.refused: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, rec: Recorded) -> Reply | str:
        with self._lock:
            recent = [t for t in self.arrivals if t > rec.at - 2.0]
            self.arrivals.append(rec.at)
            if len(recent) >= 3:
                self.refused.append(rec.at)
                return Reply.rate_limited(retry_after=1)
        return json.dumps({"similarity": 80, "precision": 80, "reason": "close to the reference"})


def most_in_any_window(times: list[float], width: float) -> int:
    ordered = sorted(times)
    return max((sum(1 for t in ordered if start <= t < start + width) for start in ordered), default=0)


def judge_spec(data: Path, base_url: str) -> dict:
    return {
        "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data)},
        "student": {"base_model": "tiny:llama", "method": "full"},
        "judge": {"batch_size": ITEMS, "max_attempts": 1},
        "judge_provider": {
            "provider": "openai-compatible", "base_url": base_url, "model": "fake-judge", "max_retries": 2,
            "price_input_per_mtok": 0, "price_output_per_mtok": 0,
            "limits": {"requests_per_minute": RPM, "max_concurrency": 8},
        },
    }


async def feed_and_measure(env: Embedded, migration_id: str, server: FakeOpenAIServer) -> int:
    """Publish the judge work, wait for the first request, then for the window; return the most messages the
    judges held at once (one each: how many replicas worked together)."""
    nc = await nats.connect(env.settings.nats_url)
    js = nc.jetstream()
    await ensure_stream(js, env.settings)
    start = start_envelope(migration_id, {})
    for batch in range(BATCHES):
        items = [JudgeItem(item_id=f"b{batch}-i{i}", instruction=f"Ticket {batch}-{i}: my parcel is late",
                           reference="shipping", candidate=f"shipping {batch}-{i}") for i in range(ITEMS)]
        event = start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=batch, batches=BATCHES, items=items),
                             round=0, key=f"batch-{batch}")
        await js.publish(env.settings.subject(Subject.JUDGE_REQUEST), event.to_bytes(),
                         headers={"Nats-Msg-Id": event.event_id})
    deadline = time.monotonic() + 60
    while not server.requests:
        dead = [p for p in env.processes if p.proc.poll() is not None]
        assert not dead, f"{dead[0].name} exited: {dead[0].log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no judge call within 60 s"
        await asyncio.sleep(0.2)
    first = server.requests[0].at
    busy = 0
    while time.monotonic() < first + WINDOW + 0.5:
        info = await js.consumer_info(env.settings.stream_name, durable_name(env.settings, "judge"))
        busy = max(busy, info.num_ack_pending)
        await asyncio.sleep(1.0)
    await nc.close()
    return busy


def test_four_judge_replicas_share_the_accounts_requests_per_minute(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "a", "response": "shipping", "split": "train"}) + "\n")
    limit = AccountLimit()
    server = FakeOpenAIServer(limit).start()
    migration_id = "m-shared-rate"
    try:
        with Embedded(tmp_path / "install", services=("judge",), replicas={"judge": REPLICAS}) as env:
            store = ArtifactStore(env.settings)
            store.ensure_bucket()
            spec = parse_spec(judge_spec(data, server.base_url))
            store.put_json(spec_key(migration_id), spec.model_dump(mode="json"))
            busy = asyncio.run(feed_and_measure(env, migration_id, server))
            for p in env.service("judge"):
                p.kill()  # the rest of the work is not needed
    finally:
        server.stop()
    first = limit.arrivals[0]
    window = [t for t in limit.arrivals if first <= t < first + WINDOW]
    worst = most_in_any_window(limit.arrivals, WINDOW)
    print(f"{REPLICAS} judge replicas at {RPM}/min: {len(window)} requests in the first {WINDOW:.0f} s, at most "
          f"{worst} in any {WINDOW:.0f} s, {len(limit.refused)} answered 429, up to {busy} batches in flight")
    assert busy >= 3, f"only {busy} replicas worked at once: the demand did not come from several processes"
    assert len(window) >= WINDOW * RPM / 60 - 3, "the judges did not even use the allowed rate"
    assert worst <= WINDOW * RPM / 60 + TOLERANCE, f"{worst} requests in {WINDOW} s, limit {RPM}/min"
    assert len(limit.refused) <= 1, f"{len(limit.refused)} requests refused with 429"
