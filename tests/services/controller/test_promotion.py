"""Promotion on completion: a migration trained on a route's captured traffic, whose spec promotes it, writes the
route's state in the routes bucket and publishes route.changed (real nats-server and S3 server)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import nats
import pytest
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from support.bus import Recorder, controller

from llamaduo.bus.broker import Bus
from llamaduo.bus.topology import routes_bucket
from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    MigrationCompleted,
    Score,
    Subject,
    TrainDone,
    start_envelope,
)
from llamaduo.contracts.routes import RouteState, promote
from llamaduo.contracts.spec import parse_spec
from llamaduo.services.controller.promotion import promoted_state
from llamaduo.storage.keys import traffic_key
from llamaduo.storage.store import ArtifactStore


def capture(store: ArtifactStore, route: str, n: int) -> None:
    """``n`` requests the upstream answered and as many a local model answered, captured a minute ago."""
    at = datetime.now(UTC) - timedelta(minutes=1)
    rows = [{"request_id": f"r{i}-{by}", "at": at.isoformat(), "answered_by": by,
             "local_version": None if by == "upstream" else "m-old",
             "messages": [{"role": "user", "content": f"Ticket {i}: my parcel {i} is late ({by})"}],
             "response": f"queue: shipping ({i})"} for i in range(n) for by in ("upstream", "local")]
    store.put_jsonl(traffic_key(route, at, uuid.uuid4().hex[:8]), rows)


def spec_for(route: str, **over) -> dict:
    return {"task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
            "dataset": {"source": f"traffic:{route}", "test_fraction": 0.2, "holdout_fraction": 0},
            "student": {"base_model": "tiny:llama", "method": "full"},
            "judge": {"threshold": 90, "batch_size": 5}, "budget": {"max_rounds": 2},
            "serve": {"model_name": "triage-student"}, **over}


#: The sha256 of the adapter folder's index that the trainer reports (the route records it for the gateway).
ADAPTER_SHA256 = "ab" * 32


async def run_to_completion(settings, migration_id: str, spec: dict, rec: Recorder) -> None:
    ctl = await controller(settings)
    player = Bus(settings, "player")
    await player.broker.connect()
    await player.emit(start_envelope(migration_id, spec))
    [req] = await rec.wait_for(Subject.TRAIN_REQUEST, 0)
    assert req.payload.rows == 16  # 20 upstream answers, 4 for eval; the 20 local answers are not data
    await player.emit(req.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key=f"a-{migration_id}", sha256=ADAPTER_SHA256), rows=16)))
    await player.emit(req.follow(Subject.INFER_DONE, InferDone(predictions=ArtifactRef(key="p0"), prompts=4,
                                                               samples_per_prompt=1, batches=1)))
    await player.emit(req.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=1, scores=[
        Score(item_id=f"i{j}", similarity=95, precision=95) for j in range(4)]), key="b0"))
    await rec.wait_for(Subject.MIGRATION_COMPLETED)
    await ctl.broker.stop()
    await player.broker.stop()


async def read_route(settings, route: str) -> RouteState | None:
    nc = await nats.connect(settings.nats_url)
    try:
        kv = await nc.jetstream().key_value(routes_bucket(settings.stream_name))
        return RouteState.from_bytes((await kv.get(route)).value)
    finally:
        await nc.close()


async def write_route(settings, route: str, state: RouteState) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket=routes_bucket(settings.stream_name), history=1)
        await kv.put(route, state.to_bytes())
    finally:
        await nc.close()


async def test_a_completed_migration_is_promoted_on_its_route(settings, store):
    route = "triage-" + uuid.uuid4().hex[:6]
    capture(store, route, 20)
    before = promote(None, "m-old", "full", local_model="triage-old")
    await write_route(settings, route, before)
    spec = spec_for(route, promotion={"route": route, "mode": "canary", "canary_percent": 25})
    async with Recorder(settings) as rec:
        await run_to_completion(settings, "m-promo", spec, rec)
        [changed] = await rec.wait_for(Subject.ROUTE_CHANGED)
    state = await read_route(settings, route)
    assert (state.version, state.mode, state.percent) == ("m-promo", "canary", 25)
    assert state.local_model == "triage-student" and state.adapter_key == "a-m-promo"
    assert state.adapter_sha256 == ADAPTER_SHA256  # the gateway downloads only an adapter with this index
    assert [h.version for h in state.history] == ["m-old"]  # a rollback returns to it
    assert changed.route == route and changed.migration_id == "m-promo" and changed.correlation_id == route
    assert changed.payload.reason == "promote" and changed.payload.version == "m-promo"
    assert changed.payload.previous == before


async def test_without_a_promotion_section_no_route_changes(settings, store):
    route = "triage-" + uuid.uuid4().hex[:6]
    capture(store, route, 20)
    async with Recorder(settings) as rec:
        await run_to_completion(settings, "m-nopromo", spec_for(route), rec)
    assert not rec.of(Subject.ROUTE_CHANGED)
    with pytest.raises((BucketNotFoundError, KeyNotFoundError)):  # nothing was written
        await read_route(settings, route)


def test_promoting_again_after_a_redelivery_keeps_the_true_previous_state():
    spec = parse_spec(spec_for("triage", promotion={"route": "triage", "mode": "full"}))
    done = MigrationCompleted(model=ArtifactRef(key="a1", sha256=ADAPTER_SHA256), best_round=0, rounds=[])
    old = promote(None, "m-0", "shadow")
    first, previous = promoted_state(old, spec, spec.promotion, "m-1", done)
    again, previous_again = promoted_state(first, spec, spec.promotion, "m-1", done)
    assert previous == old and previous_again.version == "m-0" and previous_again.mode == "shadow"
    assert [h.version for h in again.history] == ["m-0"] and again.mode == "full" and again.local_model == (
        "triage-student") and again.adapter_sha256 == ADAPTER_SHA256
