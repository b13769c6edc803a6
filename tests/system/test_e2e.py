"""The whole loop: five service processes over a real nats-server and S3 server, a tiny student, the
simulated teacher. Round 0 trains on tickets of two queues only and fails the gate; synthetic tickets of
every queue make a later round pass. Nothing is hard-coded: the scores come from the student's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import nats
import pytest
import yaml
from support.specs import THRESHOLD, triage_spec

from llamaduo.contracts.events import Subject, parse_event
from llamaduo.runtime.embedded import Embedded

pytestmark = pytest.mark.slow

def hand_made_start(migration_id: str, spec: dict, event_id: str) -> bytes:
    """What a non-Python client would send: plain JSON following docs/schemas/migration.start."""
    return json.dumps({
        "event_id": event_id, "migration_id": migration_id, "round": 0, "type": "migration.start",
        "schema_version": 1, "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": event_id,
        "causation_id": None, "payload": {"spec": spec},
    }).encode()


async def run_by_hand(env: Embedded, spec: dict, migration_id: str, timeout: float) -> list:
    nc = await nats.connect(env.settings.nats_url)
    seen: list = []
    done = asyncio.Event()

    async def on_msg(msg) -> None:
        if msg.subject.startswith(("$", "_INBOX")):
            return
        seen.append((msg.subject, msg.data))
        if msg.subject in ("migration.completed", "migration.failed"):
            done.set()

    await nc.subscribe(">", cb=on_msg)
    js = nc.jetstream()
    # the stream exists once a service has started; publish the same start twice with two event ids
    for _ in range(100):
        try:
            await js.stream_info(env.settings.stream_name)
            break
        except Exception:
            await asyncio.sleep(0.2)
    await js.publish("migration.start", hand_made_start(migration_id, spec, "start-1"),
                     headers={"Nats-Msg-Id": "start-1"})
    await js.publish("migration.start", hand_made_start(migration_id, spec, "start-2"),
                     headers={"Nats-Msg-Id": "start-2"})
    try:
        deadline = time.monotonic() + timeout
        while not done.is_set():
            dead = [p for p in env.processes if p.proc.poll() is not None]
            assert not dead, f"{dead[0].name} exited: {dead[0].log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no terminal event within {timeout}s"
            await asyncio.sleep(0.5)
    finally:
        await asyncio.sleep(0.5)
        await nc.close()
    return seen


FAKE_SECRETS = {"OPENAI_API_KEY": "sk-test-" + "Zq7" * 10, "GEMINI_API_KEY": "AIza-fake-" + "k9" * 12,
                "LLAMADUO_NATS_TOKEN_UNUSED": "tok-" + "x7" * 10}


def with_holdout(data: Path, rows: int) -> Path:
    """``data`` plus ``rows`` rows labelled 'holdout' (new tickets of the same task)."""
    from llamaduo.tasks.triage import make_dataset

    known = {json.loads(line)["instruction"] for line in data.read_text().splitlines() if line.strip()}
    extra = [{**r, "split": "holdout"} for r in make_dataset(n_train=0, n_test=rows * 2, seed=99)
             if r["instruction"] not in known][:rows]
    out = data.with_name("with-holdout.jsonl")
    out.write_text(data.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    return out


def test_full_loop_by_hand_with_plain_nats_client(tmp_path: Path, triage_data: Path) -> None:
    spec = triage_spec(with_holdout(triage_data, 8))
    migration_id = "e2e-" + uuid.uuid4().hex[:6]
    with Embedded(tmp_path / "install", extra_env=FAKE_SECRETS) as env:
        started = time.monotonic()
        seen = asyncio.run(run_by_hand(env, spec, migration_id, timeout=420))
        elapsed = time.monotonic() - started
        logs = {p.name: p.log_path.read_text()[-3000:] for p in env.processes if p.log_path}
        secrets = [*FAKE_SECRETS.values(), env.s3.secret_key]
        stored = b"".join(p.read_bytes() for p in (tmp_path / "install" / "s3").rglob("*") if p.is_file()
                          and p.suffix in (".json", ".jsonl", ".html"))
    # no secret in any log line, event or stored artifact
    everything = b"".join(p.read_bytes() for p in (tmp_path / "install" / "logs").glob("*.log"))
    everything += b"".join(data for _, data in seen) + stored
    for secret in secrets:
        assert secret.encode() not in everything, "a secret leaked"
    # A core subscriber on '>' also sees each JetStream delivery to a pull consumer (same subject), so a
    # message arrives once per publish plus once per consumer: event_id, the idempotency key, tells them apart.
    events, ids = [], set()
    for subject, data in seen:
        event = parse_event(data) if not subject.startswith("dlq.") else None
        if event is not None and event.event_id not in ids:
            ids.add(event.event_id)
            events.append(event)
    assert all(e.migration_id == migration_id for e in events)
    assert events[-1].type == Subject.MIGRATION_COMPLETED, (events[-1], logs)
    types = [e.type for e in events]
    # every event carries the documented envelope, in causal order
    assert types[0] == Subject.MIGRATION_START
    assert types.index(Subject.TRAIN_REQUEST) < types.index(Subject.TRAIN_DONE) < types.index(
        Subject.INFER_DONE) < types.index(Subject.EVAL_SCORED) < types.index(Subject.SYNTH_REQUEST)
    assert {e.correlation_id for e in events if e.type != Subject.MIGRATION_START} == {"start-1"}
    # the second migration.start (another event id, same migration) started nothing
    train0 = [(e.event_id, e.causation_id) for e in events if e.type == Subject.TRAIN_REQUEST and e.round == 0]
    assert len(train0) == 1, train0
    rounds = events[-1].payload.rounds
    assert len(rounds) >= 2, rounds
    first, last = rounds[0], rounds[-1]
    assert first.aggregates["similarity_mean"] < THRESHOLD and first.decision == "continue"
    assert last.aggregates["similarity_mean"] >= THRESHOLD and last.decision == "pass"
    assert first.synthetic_rows == 0 and last.synthetic_rows > 0
    assert last.train_rows == first.train_rows + last.synthetic_rows
    for r in rounds:  # every test answer judged once per round, unless sequential early stopping decided
        assert r.failed_judgements == 0
        assert r.judged == 40 or (r.early_stopped and 10 <= r.judged < 40), r
    # the holdout: answered by the chosen round's adapter once, at the end, judged in full, beside the gate score
    holdout_requests = [e for e in events if e.type == Subject.INFER_REQUEST]
    assert [(e.round, e.payload.split) for e in holdout_requests] == [(last.round, "holdout")]
    assert types.index(Subject.INFER_REQUEST) > max(i for i, e in enumerate(events) if e.type == Subject.EVAL_SCORED
                                                    and e.payload.split == "eval")
    assert last.holdout_judged == last.holdout_to_judge == 8 and "similarity_mean" in last.holdout_aggregates
    assert all(not r.holdout_aggregates for r in rounds[:-1]) and last.decision == "pass"
    print(f"e2e: {len(rounds)} rounds in {elapsed:.0f}s: "
          + ", ".join(f"r{r.round} {r.aggregates['similarity_mean']:.1f}" for r in rounds)
          + f"; holdout {last.holdout_aggregates['similarity_mean']:.1f}")


def test_cli_migrate_embedded_live_view_programmatic_judge(tmp_path: Path, triage_data: Path) -> None:
    """The CLI on a terminal (a pty): the live view draws; the judge is the programmatic checker."""
    spec = triage_spec(triage_data)
    spec["judge"] = {**spec["judge"], "method": "programmatic", "checker": "normalised"}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    terminal, child = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaduo.cli", "migrate", str(spec_path), "--embedded", "--json",
         "--data-dir", str(tmp_path / "install"), "--timeout", "600"],
        stdout=subprocess.PIPE, stderr=child, env={**os.environ, "COLUMNS": "140"},
    )
    os.close(child)
    screen: list[bytes] = []

    def read_terminal() -> None:  # a pty must be drained or the child blocks writing to it
        with contextlib.suppress(OSError):
            while data := os.read(terminal, 65536):
                screen.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=700)
    reader.join(10)
    os.close(terminal)
    drawn = b"".join(screen).decode(errors="replace")
    assert proc.returncode == 0, drawn[-4000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["status"] == "completed" and len(summary["rounds"]) >= 2
    first, last = summary["rounds"][0], summary["rounds"][-1]
    assert first["decision"] == "continue" and last["decision"] == "pass"
    # an exact checker scores 1 or 100 per answer: the round means say how many answers were right
    for r in summary["rounds"]:  # (the summary rounds means to 2 decimals)
        right = (r["aggregates"]["similarity_mean"] - 1) * r["aggregates"]["judged"] / 99
        assert abs(right - round(right)) < 0.01, r
    assert "\x1b[" in drawn, "no terminal drawing"
    assert f"judged {last['aggregates']['judged']:.0f}/40" in drawn and "service LLM" in drawn
    assert "step " in drawn and "[round 0] trained on" in drawn


def test_cli_migrate_embedded_json(tmp_path: Path, triage_data: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(triage_spec(triage_data)))
    proc = subprocess.run(
        [sys.executable, "-m", "llamaduo.cli", "migrate", str(spec_path), "--embedded", "--json",
         "--data-dir", str(tmp_path / "install"), "--timeout", "600"],
        capture_output=True, text=True, timeout=700,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["simulated_teacher"] is True
    assert len(summary["rounds"]) >= 2
    assert summary["rounds"][0]["decision"] == "continue" and summary["rounds"][-1]["decision"] == "pass"
    assert summary["rounds"][-1]["training_rows"] > summary["rounds"][0]["training_rows"]
    assert "[round 0] training" in proc.stderr
    # where the wall time went, from the work every service reported on its events
    stages = summary["stages"]
    assert all(stages["busy_seconds"][s] > 0 for s in ("load", "train", "generate", "judge", "synthesize")), stages
    assert sum(stages["seconds"].values()) == pytest.approx(stages["wall_seconds"], rel=1e-3)
    assert "wall time by stage: " in proc.stderr and "bus/idle" in proc.stderr
