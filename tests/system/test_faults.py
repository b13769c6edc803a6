"""Faults injected into real processes (kill -9, server restarts) during a whole migration.

Each scenario runs the tiny-student triage migration of tests/system/test_e2e.py on an embedded installation and
injects one fault when a given event is seen. The migration must still complete, and every test answer must
be judged exactly once per round (checked on the event ids stored in the stream).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from support.bus import stored_events
from support.specs import triage_spec

from llamaduo.contracts.events import Subject
from llamaduo.runtime.embedded import Embedded

pytestmark = pytest.mark.slow

TEST_ROWS = 40


def spec(data: Path) -> dict:
    """The e2e migration, judged in smaller batches so that a kill lands mid-round."""
    base = triage_spec(data)
    return {**base, "judge": {**base["judge"], "batch_size": 5}}


Fault = Callable[[Embedded], None]


def restart(name: str) -> Fault:
    def fault(env: Embedded) -> None:
        for p in env.service(name):
            p.kill()  # SIGKILL: no cleanup, in-flight work unacked
        env.start_service(name, index=9)
    return fault


def terminate(name: str, stopped: list[tuple[str, int, float]]) -> Fault:
    """SIGTERM (graceful stop) of every ``name`` process; record its exit code and how long it took."""
    def fault(env: Embedded) -> None:
        for p in env.service(name):
            began = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            code = p.proc.wait(60)
            stopped.append((name, code, time.monotonic() - began))
        env.start_service(name, index=8)
    return fault



Step = tuple[Subject, int, Fault]


async def _run(env: Embedded, spec_: dict, steps: list[Step], timeout: float) -> list:
    """Run the migration; inject each fault, in order, when its (subject, round) is first seen."""
    nc = await nats.connect(env.settings.nats_url)
    pending = list(steps)
    finished = asyncio.Event()

    async def on_msg(msg) -> None:
        if msg.subject in ("migration.completed", "migration.failed"):
            finished.set()
        if not pending or msg.subject != pending[0][0]:
            return
        if json.loads(msg.data).get("round") == pending[0][1]:
            _, _, fault = pending.pop(0)
            await asyncio.to_thread(fault, env)

    await nc.subscribe(">", cb=on_msg)
    from llamaduo.bus.client import publish_start, wait_ready
    from llamaduo.contracts.spec import parse_spec

    await wait_ready(env.settings)
    await publish_start(env.settings, "m-fault", parse_spec(spec_))
    deadline = time.monotonic() + timeout
    while not finished.is_set():
        assert time.monotonic() < deadline, "migration did not finish in time"
        await asyncio.sleep(0.5)
    await nc.close()
    assert not pending, f"faults never injected: {pending}"
    return await stored_events(env.settings)


def check_complete_and_exactly_once(events: list) -> None:
    assert events[-1].type == Subject.MIGRATION_COMPLETED, events[-1]
    rounds = events[-1].payload.rounds
    assert len(rounds) >= 2 and rounds[-1].decision == "pass"
    scored = [e for e in events if e.type == Subject.EVAL_SCORED]
    assert len({e.event_id for e in scored}) == len(scored), "an eval.scored event was stored twice"
    for r in rounds:
        batches = [e for e in scored if e.round == r.round]
        items = [(s.item_id, s.sample) for e in batches for s in e.payload.scores]
        # batches judged after an early close are stored too, but counted by nobody
        assert len(items) == len(set(items)) >= r.judged, f"round {r.round}: {len(items)} judged answers"
        if not getattr(r, "early_stopped", False):  # sequential early stopping may judge fewer
            assert r.judged == TEST_ROWS and sorted(e.payload.batch for e in batches) == list(range(len(batches)))


def test_kill_minus_nine_of_every_worker_mid_work(tmp_path: Path, triage_data: Path) -> None:
    """One migration, four SIGKILLs: judge and controller mid-round 0, inference while answering round 1,
    trainer mid-training of round 1; each is restarted as a new process."""
    steps: list[Step] = [
        (Subject.EVAL_SCORED, 0, restart("judge")),
        (Subject.MIGRATION_PROGRESS, 1, restart("controller")),
        (Subject.TRAIN_PROGRESS, 1, restart("trainer")),
        (Subject.TRAIN_DONE, 1, restart("inference")),
    ]
    with Embedded(tmp_path / "install", extra_env={"LLAMADUO_ACK_WAIT_SECONDS": "4"}) as env:
        events = asyncio.run(_run(env, spec(triage_data), steps, timeout=400))
    check_complete_and_exactly_once(events)


def test_nats_server_restart_mid_migration(tmp_path: Path, triage_data: Path) -> None:
    def bounce(env: Embedded) -> None:
        assert env.nats is not None
        env.nats.stop()
        time.sleep(2)
        env.nats.start()  # same port, same JetStream folder

    with Embedded(tmp_path / "install", extra_env={"LLAMADUO_ACK_WAIT_SECONDS": "4"}) as env:
        events = asyncio.run(_run(env, spec(triage_data), [(Subject.TRAIN_DONE, 0, bounce)], timeout=300))
    check_complete_and_exactly_once(events)


def test_s3_outage_of_ten_seconds(tmp_path: Path, triage_data: Path) -> None:
    def outage(env: Embedded) -> None:
        assert env.s3 is not None
        env.s3.stop()
        time.sleep(10)
        env.s3.start()

    with Embedded(tmp_path / "install", extra_env={"LLAMADUO_ACK_WAIT_SECONDS": "4"}) as env:
        events = asyncio.run(_run(env, spec(triage_data), [(Subject.SYNTH_REQUEST, 1, outage)], timeout=300))
    check_complete_and_exactly_once(events)



def test_sigterm_returns_in_flight_work(tmp_path: Path, triage_data: Path) -> None:
    """SIGTERM of the judge mid-round and of the trainer mid-training: each exits cleanly (code 0) within
    its graceful timeout, having finished or returned its work; the restarted trainer resumes from the
    checkpoint saved at the stop instead of starting over; nothing is lost or judged twice."""
    stopped: list[tuple[str, int, float]] = []
    steps: list[Step] = [
        (Subject.EVAL_SCORED, 0, terminate("judge", stopped)),
        (Subject.TRAIN_PROGRESS, 1, terminate("trainer", stopped)),
    ]
    with Embedded(tmp_path / "install", extra_env={"LLAMADUO_ACK_WAIT_SECONDS": "4"}) as env:
        events = asyncio.run(_run(env, spec(triage_data), steps, timeout=400))
        trainer_logs = "".join(p.log_path.read_text() for p in env.processes
                               if p.name.startswith("trainer") and p.log_path)
    check_complete_and_exactly_once(events)
    assert [(name, code) for name, code, _ in stopped] == [("judge", 0), ("trainer", 0)]
    assert all(seconds < 35 for _, _, seconds in stopped), stopped
    assert "in-flight work returned" in trainer_logs
    assert re.search(r"resuming training from checkpoint-[1-9]", trainer_logs), "the restarted trainer began anew"
