"""``llamaduo cancel`` on a real installation (nats-server, S3 server, the five service processes; tiny student,
simulated teacher): the triage migration of tests/system/test_e2e.py is cancelled while round 1 trains (round 0
done, below the gate). It ends ``cancelled`` with round 0's adapter kept, and nothing of it happens afterwards:
no event after the terminal one, no new object under its S3 prefix."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from support.bus import stored_events
from support.specs import triage_spec

from llamaduo.contracts.events import CANCELLED_REASON, Subject
from llamaduo.runtime.embedded import Embedded
from llamaduo.storage.keys import migration_key
from llamaduo.storage.store import ArtifactStore

pytestmark = pytest.mark.slow

MIGRATION = "m-cancel"
QUIET_S = 6.0



def cli(env: Embedded, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaduo.cli", *args], env=env.env(), capture_output=True,
                          text=True, timeout=180)


async def cancel_while_round_one_trains(env: Embedded, spec: dict) -> dict:
    from llamaduo.bus.client import publish_start, wait_ready
    from llamaduo.contracts.spec import parse_spec

    nc = await nats.connect(env.settings.nats_url)
    training = asyncio.Event()

    async def on_msg(msg) -> None:
        if msg.subject == "train.progress" and json.loads(msg.data).get("round") == 1:
            training.set()

    await nc.subscribe("train.progress", cb=on_msg)
    await wait_ready(env.settings)
    await publish_start(env.settings, MIGRATION, parse_spec(spec))
    await asyncio.wait_for(training.wait(), 400)
    await nc.close()
    began = time.monotonic()
    done = await asyncio.to_thread(cli, env, "cancel", MIGRATION, "--reason", "test")
    took = time.monotonic() - began
    store = ArtifactStore(env.settings)
    prefix = migration_key(MIGRATION) + "/"
    at_end = set(await asyncio.to_thread(store.list, prefix))
    await asyncio.sleep(QUIET_S)
    later = set(await asyncio.to_thread(store.list, prefix))
    again = await asyncio.to_thread(cli, env, "cancel", MIGRATION)
    status = await asyncio.to_thread(cli, env, "status", MIGRATION)
    return {"done": done, "took": took, "new_objects": later - at_end, "again": again, "status": status,
            "events": await stored_events(env.settings)}


def test_cancel_mid_round_one_keeps_round_zero_and_stops_every_service(tmp_path: Path, triage_data: Path) -> None:
    with Embedded(tmp_path / "install") as env:
        out = asyncio.run(cancel_while_round_one_trains(env, triage_spec(triage_data)))
        logs = {p.name: p.log_path.read_text() for p in env.processes if p.log_path}
    done = out["done"]
    assert done.returncode == 0, done.stderr
    assert "migration m-cancel cancelled; best round 0 kept: migrations/m-cancel/round-0/adapter" in done.stdout
    print(f"cancel CLI returned after {out['took']:.1f}s")

    events = [e for e in out["events"] if e.migration_id == MIGRATION]
    terminal = [i for i, e in enumerate(events) if e.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED)]
    assert len(terminal) == 1 and terminal[0] == len(events) - 1, [e.type for e in events[terminal[0]:]]
    final = events[-1].payload
    assert final.reason == CANCELLED_REASON and final.detail.startswith("cancelled by ") and final.detail.endswith(
        ": test")
    assert final.best_round == 0 and final.best_model.key.startswith("migrations/m-cancel/round-0/adapter")
    assert [r.decision for r in final.rounds] == ["continue"]  # round 0 below the gate, round 1 never gated
    # round 1 was training when the cancel came: it stopped between steps, with no train.done and no adapter
    assert not [e for e in events if e.type == Subject.TRAIN_DONE and e.round == 1]
    assert "work stopped: migration cancelled" in logs["trainer-0"]
    assert out["new_objects"] == set()  # nothing written for it after its terminal event (over QUIET_S)

    again = out["again"]
    assert again.returncode == 0 and "cancelled (already)" in again.stdout, again.stderr
    assert out["status"].stdout.startswith("m-cancel: cancelled (round 1)"), out["status"].stdout
