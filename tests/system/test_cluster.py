"""A migration on a three-node JetStream cluster (R3 stream and buckets) survives a kill -9 of the node that
leads the stream mid-round: the services reconnect to the surviving nodes, the migration completes, and every
test answer of every round is judged exactly once (checked on the eval.scored events stored in the stream)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from support.bus import stored_events
from support.specs import triage_spec

from llamaduo.bus.connection import connect
from llamaduo.contracts.events import Subject
from llamaduo.runtime.embedded import Embedded
from llamaduo.settings import Settings

pytestmark = pytest.mark.slow

TEST_ROWS = 40
MIGRATION = "m-cluster"


async def _stream_leader(settings: Settings) -> str:
    nc = await connect(settings)
    try:
        return (await nc.jetstream().stream_info(settings.stream_name)).cluster.leader
    finally:
        await nc.close()



async def _run(env: Embedded, spec: dict, timeout: float) -> tuple[str, str, list]:
    """Run the migration; at the first eval.scored of round 0, kill -9 the stream's leader node.
    ``(killed node, leader afterwards, stored events)``."""
    from llamaduo.bus.client import publish_start, wait_ready
    from llamaduo.contracts.spec import parse_spec

    assert env.cluster
    settings = env.settings
    killed: list[str] = []
    finished = asyncio.Event()

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        if msg.subject in ("migration.completed", "migration.failed"):
            finished.set()
        if not killed and msg.subject == Subject.EVAL_SCORED and json.loads(msg.data).get("round") == 0:
            leader = await _stream_leader(settings)
            killed.append(leader)
            env.cluster.server(leader).process.kill()  # type: ignore[union-attr]  # SIGKILL, store left as is

    nc = await connect(settings)
    await nc.subscribe(">", cb=on_msg)
    await wait_ready(settings)
    await publish_start(settings, MIGRATION, parse_spec(spec))
    deadline = time.monotonic() + timeout
    while not finished.is_set():
        assert time.monotonic() < deadline, "migration did not finish in time"
        await asyncio.sleep(0.5)
    await nc.close()
    assert killed, "the stream leader was never killed"
    return killed[0], await _stream_leader(settings), await stored_events(settings)


def test_migration_survives_kill_minus_nine_of_the_stream_leader(tmp_path: Path, triage_data: Path) -> None:
    base = triage_spec(triage_data)
    spec = {**base, "judge": {**base["judge"], "batch_size": 5}}  # several batches: the kill lands mid-round
    began = time.monotonic()
    with Embedded(tmp_path / "install", nats_nodes=3, extra_env={"LLAMADUO_ACK_WAIT_SECONDS": "4"}) as env:
        killed, leader, events = asyncio.run(_run(env, spec, timeout=240))
        crashed = [p.name for p in env.processes if p.proc.poll() is not None]
    print(f"killed stream leader {killed}, new leader {leader}, wall {time.monotonic() - began:.1f}s")
    assert leader != killed and crashed == []

    assert events[-1].type == Subject.MIGRATION_COMPLETED, events[-1]
    rounds = events[-1].payload.rounds
    assert len(rounds) >= 2
    scored = [e for e in events if e.type == Subject.EVAL_SCORED]
    assert len({e.event_id for e in scored}) == len(scored), "an eval.scored event was stored twice"
    for r in rounds:
        items = [(s.item_id, s.sample) for e in scored if e.round == r.round for s in e.payload.scores]
        assert len(items) == len(set(items)), f"round {r.round}: an answer was judged twice"
        if not getattr(r, "early_stopped", False):  # sequential early stopping may judge fewer
            assert len({i for i, _ in items}) == r.judged == TEST_ROWS, f"round {r.round}: {len(items)} judged"
