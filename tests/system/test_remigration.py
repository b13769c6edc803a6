"""Shadow watch -> re-migration -> promotion only if better, end to end (issue 12 item 6).

The scene of tests/system/test_continuity.py (real nats-server and S3, the five migration services as processes,
a gateway replica in this process, the fake OpenAI server as the route's service LLM, a ``llamaduo serve
--adapters-dir`` app of the tiny base model as its local side) with a ``shadow`` section on the route: every
locally answered request is sampled (``sample_rate`` 1.0), judged by the judge service through a second fake
server that scores every comparison low, and counted by the gateway's shadow watch. A first migration from the
captured traffic is promoted in full; its shadow scores fill the window below the threshold -> one
``route.degraded`` and one re-migration from the route's ``remigrate.spec`` template, which runs through the real
services, judges the route's current version on its eval split (stage ``baseline``) and is promoted iff its gate
value is strictly greater than the baseline's (asserted on the numbers the terminal event records, whatever they
are: which side wins is up to two tiny students).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.llm_servers import FakeOpenAIServer, Recorded
from support.bus import stored_events

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, start_envelope
from llamaduo.contracts.routes import RouteState
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded
from llamaduo.services.gateway.watch import remigration_id_of
from llamaduo.serving.server import ServerThread
from llamaduo.storage.keys import baseline_adapter_key
from llamaduo.tasks.triage import make_dataset
from tests.system.test_continuity import (
    ROUTE,
    USERS,
    Scene,
    answer_as_service_llm,
    spec,
    tiny_local_server,
    unique,
)
from tests.system.test_continuity import running as continuity_running

pytestmark = pytest.mark.slow

WINDOW = 4
THRESHOLD = 50.0
LOW = 12  # what the shadow judge says of every local answer


def judge_low(request: Recorded) -> str:
    return json.dumps({"similarity": LOW, "precision": LOW, "reason": "not the service LLM's queue"})


def template() -> dict[str, Any]:
    """The route's re-migration template: the continuity spec without its promotion (the watch sets both the
    traffic source and the promotion policy), training harder than the first migration (whose two gentle epochs
    leave the student at the judge's floor), so that the re-migration can beat the current version."""
    data = {k: v for k, v in spec().items() if k != "promotion"}
    student = data["student"]
    return {**data, "student": {**student, "lora": {"r": 8, "dropout": 0.0},
                                "training": {**student["training"], "epochs": 8, "learning_rate": 0.01}}}


async def running(env: Embedded, upstream: FakeOpenAIServer, judge: FakeOpenAIServer, local: ServerThread,
                  adapters_dir: Path, template_path: Path) -> AsyncIterator[Scene]:
    """test_continuity's gateway, its route with a shadow watch judged by ``judge`` that re-migrates."""
    shadow = {"sample_rate": 1.0, "threshold": THRESHOLD, "window": WINDOW,
              "judge": {"provider": "openai-compatible", "model": "judge-model", "base_url": judge.base_url,
                        "max_retries": 0},
              "remigrate": {"spec": str(template_path)}}
    async for scene in continuity_running(env, upstream, local, adapters_dir, shadow):
        yield scene


async def finished(scene: Scene, migration_id: str, timeout: float = 120.0) -> Any:
    """The migration's migration.completed (a migration.failed fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        ends = [e for e in scene.recorder.events if e.migration_id == migration_id
                and e.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED)]
        if ends:
            assert ends[0].type == Subject.MIGRATION_COMPLETED, ends[0].payload
            return ends[0]
        scene.services_alive()
        assert time.monotonic() < deadline, [(e.type, e.migration_id) for e in scene.recorder.events][-20:]
        await asyncio.sleep(0.5)


async def distinct(scene: Scene, subject: Subject, count: int, timeout: float = 30.0) -> list[Any]:
    """At least ``count`` distinct events of ``subject`` (the recorder may see an event more than once)."""
    deadline = time.monotonic() + timeout
    while len(seen := unique(scene.recorder.of(subject))) < count:
        assert time.monotonic() < deadline, f"{len(seen)} {subject} of {count} within {timeout}s"
        await asyncio.sleep(0.05)
    return seen


async def route_state(scene: Scene) -> RouteState:
    import nats

    from llamaduo.bus.topology import routes_bucket

    nc = await nats.connect(scene.env.settings.nats_url)
    try:
        kv = await nc.jetstream().key_value(routes_bucket(scene.env.settings.stream_name))
        return RouteState.from_bytes((await kv.get(ROUTE)).value)
    finally:
        await nc.close()


async def remigration(scene: Scene, tickets: list[str], judge: FakeOpenAIServer) -> None:
    # (a) the service LLM answers the application; every pair is captured
    captured = [await scene.ask(t, USERS[i % len(USERS)]) for i, t in enumerate(tickets)]
    assert set((await scene.sides(captured)).values()) == {("upstream", None)}
    await asyncio.sleep(1.5)  # the capture's batch age: the rows are in S3
    assert not judge.requests  # the route is off: nothing answered locally, nothing to judge

    # (b) a first migration learns from the traffic and is promoted in full
    first = "cont-" + uuid.uuid4().hex[:6]
    bus = Bus(scene.env.settings, "test-client")
    await bus.broker.connect()
    try:
        await bus.emit(start_envelope(first, {**spec(), "promotion": {"route": ROUTE, "mode": "full"}}))
    finally:
        await bus.broker.stop()
    await finished(scene, first)
    await scene.wait_route("full", first)
    deadline = time.monotonic() + 30
    while first not in await scene.local_models():
        assert time.monotonic() < deadline, "the adapter was never loaded into the local server"
        await asyncio.sleep(0.2)

    # (c) its local answers are shadowed, judged low; the window fills below the threshold: degraded, once
    local = [await scene.ask(tickets[i], USERS[i]) for i in range(WINDOW)]
    assert set((await scene.sides(local)).values()) == {("local", first)}
    scores = await distinct(scene, Subject.SHADOW_SCORED, WINDOW)
    assert {(s.payload.version, s.payload.similarity, s.payload.failed) for s in scores} == {(first, LOW, False)}
    assert {s.payload.request_id for s in scores} == set(local)
    [degraded] = unique(await scene.recorder.wait_for(Subject.ROUTE_DEGRADED, timeout=30))
    assert (degraded.payload.version, degraded.payload.window) == (first, WINDOW)
    assert degraded.payload.rolling_score == LOW < THRESHOLD == degraded.payload.threshold
    again = degraded.payload.remigration_id
    assert again == remigration_id_of(ROUTE, first) and degraded.migration_id == first

    # (d) the re-migration runs through the services, judges the current version on its eval split, and ends
    done = await finished(scene, again)
    await asyncio.sleep(1.0)  # anything the completion's transition published is in the stream
    events = {e.event_id: e for e in await stored_events(scene.env.settings)}.values()

    def of(subject: Subject, migration_id: str | None = None) -> list[Any]:
        return [e for e in events if e.type == subject and (migration_id is None or e.migration_id == migration_id)]

    assert {e.migration_id for e in of(Subject.MIGRATION_START)} == {first, again}
    assert len(of(Subject.MIGRATION_START)) == 2 and len(of(Subject.ROUTE_DEGRADED)) == 1
    [start] = of(Subject.MIGRATION_START, again)
    started = parse_spec(start.payload.spec)
    assert started.dataset.source == f"traffic:{ROUTE}"
    assert started.promotion is not None and (started.promotion.route, started.promotion.mode,
                                              started.promotion.only_if_better) == (ROUTE, "full", True)
    assert of(Subject.TRAIN_DONE, again)
    assert [e for e in of(Subject.MIGRATION_PROGRESS, again) if e.payload.stage == "baseline"]
    [asked] = [e for e in of(Subject.INFER_REQUEST, again) if e.payload.split == "baseline"]
    assert asked.payload.adapter.key == baseline_adapter_key(again, asked.round)  # a copy under its own prefix

    completed = done.payload
    baseline = completed.baseline
    assert baseline is not None and baseline.version == first and baseline.adapter == asked.payload.adapter
    assert baseline.gate_metric == "similarity_mean" and baseline.score is not None
    assert baseline.judged == baseline.to_judge > 0 and not baseline.note
    [best] = [r for r in completed.rounds if r.round == completed.best_round]
    gate = best.aggregates["similarity_mean"]
    better = gate > baseline.score
    print(f"re-migration: {gate:.2f} vs the current version's {baseline.score:.2f}: {completed.promotion}")
    assert completed.promotion == ("promoted" if better else "kept_current"), completed.promotion_detail

    changed = of(Subject.ROUTE_CHANGED, again)
    state = await route_state(scene)
    if better:
        [change] = changed
        assert (change.payload.mode, change.payload.version, change.payload.reason) == ("full", again, "promote")
        assert change.payload.previous is not None and change.payload.previous.version == first
        assert (state.mode, state.version, state.adapter_key) == ("full", again, completed.model.key)
        await scene.wait_route("full", again)
    else:
        assert changed == []
        assert (state.mode, state.version) == ("full", first)
        assert (await scene.route_model())["version"] == first


def test_low_shadow_scores_remigrate_and_promote_only_if_better(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))  # the services' tiny base is this one
    tickets = [row["instruction"] for row in make_dataset(n_train=0, n_test=32, seed=5)]
    template_path = tmp_path / "remigrate.yaml"
    template_path.write_text(yaml.safe_dump(template()))
    local, adapters_dir = tiny_local_server(tmp_path)
    started = time.monotonic()
    try:
        with FakeOpenAIServer(responder=answer_as_service_llm) as upstream, \
                FakeOpenAIServer(responder=judge_low) as judge, Embedded(tmp_path / "install") as env:

            async def scenario() -> None:
                async for scene in running(env, upstream, judge, local, adapters_dir, template_path):
                    await remigration(scene, tickets, judge)

            asyncio.run(scenario())
    finally:
        local.stop()
    print(f"re-migration: {time.monotonic() - started:.0f}s")
