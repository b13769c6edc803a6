"""State that scales (issue 10): a migration through the real services with 5,000 judged answers per round
over 3 rounds runs to its end, and the controller's KV value stays under a fixed bound whatever the number of
answers (per-answer scores go to S3, one object per judged batch; the state keeps statistics).

Five service processes over a real nats-server and S3 server; the tiny student answers 1,250 test prompts
K=4 times at temperature 1 (5,000 answers); the programmatic checker judges (no service calls), 250 answers
per batch, early stopping off so every answer is judged; the gate (similarity 100) never passes, so the
migration ends after ``budget.max_rounds: 3`` with reason ``max_rounds``, keeping the best round.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import nats
import pytest

from llamaduo.bus.client import list_states
from llamaduo.contracts.events import Subject, parse_event, start_envelope
from llamaduo.runtime.embedded import Embedded
from llamaduo.tasks.triage import make_dataset

pytestmark = pytest.mark.slow

PROMPTS, K, ROUNDS = 1250, 4, 3
#: Fixed bound on the controller's largest KV value (bytes), independent of the number of answers: the spec
#: (~3 KB), a few KB per round (summary, statistics, a 1-bit-per-batch bitmap, at most PENDING_KEEP pending
#: batch statistics), the last 64 event ids and one transition's outbox.
KV_BOUND = 64 * 1024


def spec_for(data: Path) -> dict:
    return {
        "task": {"name": "ticket-triage", "system_prompt": "Route the ticket to one queue.",
                 "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data), "seed": 0},
        "student": {
            "base_model": "tiny:llama", "method": "full",
            "training": {"epochs": 1, "learning_rate": 0.001, "batch_size": 8, "max_length": 96},
            "inference": {"samples_per_prompt": K, "temperature": 1.0, "max_new_tokens": 3, "batch_size": 256},
        },
        "judge": {"method": "programmatic", "checker": "normalised", "gate": "similarity_mean", "threshold": 100,
                  "batch_size": 250, "early_stopping": False},
        # 1,250 short templated test tickets overlap any new ticket: decontamination made lenient (not tested here)
        "synthesis": {"samples_per_round": 16, "seeds_per_call": 2, "examples_per_call": 8,
                      "decontamination_common_share": 0.001, "near_duplicate_threshold": 0.98},
        "budget": {"max_rounds": ROUNDS},
    }


async def run(env: Embedded, spec: dict, migration_id: str, timeout: float) -> tuple[list, int, object]:
    """Publish the start, record every event and the size of every KV write; return them and the state read
    right after the terminal event."""
    nc = await nats.connect(env.settings.nats_url)
    events: dict[str, object] = {}
    largest = 0
    done = asyncio.Event()

    async def on_event(msg) -> None:
        if msg.subject.startswith(("$", "_INBOX", "dlq.")):
            return
        event = parse_event(msg.data)
        events.setdefault(event.event_id, event)
        if event.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED):
            done.set()

    async def on_kv(msg) -> None:
        nonlocal largest
        largest = max(largest, len(msg.data))

    await nc.subscribe(">", cb=on_event)
    await nc.subscribe(f"$KV.{env.settings.kv_bucket}.>", cb=on_kv)
    js = nc.jetstream()
    for _ in range(300):
        try:
            await js.stream_info(env.settings.stream_name)
            break
        except Exception:
            await asyncio.sleep(0.2)
    start = start_envelope(migration_id, spec)
    await js.publish(env.settings.subject(Subject.MIGRATION_START), start.to_bytes(),
                     headers={"Nats-Msg-Id": start.event_id})
    deadline = time.monotonic() + timeout
    try:
        while not done.is_set():
            dead = [p for p in env.processes if p.proc.poll() is not None]
            assert not dead, f"{dead[0].name} exited: {dead[0].log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no terminal event within {timeout}s"
            await asyncio.sleep(0.1)
        [state] = await list_states(env.settings, migration_id)  # right after the terminal event
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    return list(events.values()), largest, state


def test_5000_answers_per_round_over_3_rounds_keep_the_kv_value_bounded(tmp_path: Path) -> None:
    data = tmp_path / "triage.jsonl"
    rows = make_dataset(n_train=16, n_test=PROMPTS, seed=5)
    # the simulated teacher draws tickets from the same templates: a reference number keeps 1,250 test tickets
    # apart from the synthetic ones, which decontamination would otherwise remove as copies
    rows = [{**r, "instruction": f"Ref T{i:05d}. {r['instruction']}"} if r["split"] == "test" else r
            for i, r in enumerate(rows)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    migration_id = "scale-" + uuid.uuid4().hex[:6]
    with Embedded(tmp_path / "install") as env:
        started = time.monotonic()
        events, largest, state = asyncio.run(run(env, spec_for(data), migration_id, timeout=900))
        elapsed = time.monotonic() - started
        logs = {p.name: p.log_path.read_text()[-2000:] for p in env.processes if p.log_path}
        score_objects = sorted(p.name for p in (tmp_path / "install" / "s3").rglob("batch-*.jsonl"))
    terminal = events[-1] if events[-1].type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED) else next(
        e for e in events if e.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED))
    rounds = terminal.payload.rounds
    for e in events:
        if e.type == Subject.SYNTH_READY:
            print(f"round {e.round} synthesis: kept {e.payload.kept}/{e.payload.generated}, {e.payload.removed}")
    print(f"state-scale: {len(rounds)} rounds x {PROMPTS * K} answers in {elapsed:.0f}s; largest KV value "
          f"{largest} bytes (bound {KV_BOUND}); outcome {terminal.type} "
          f"{getattr(terminal.payload, 'reason', '')} {getattr(terminal.payload, 'detail', '')[:600]}")
    assert terminal.type == Subject.MIGRATION_FAILED and terminal.payload.reason == "max_rounds", (terminal, logs)
    assert len(rounds) == ROUNDS
    for r in rounds:
        assert r.to_judge == PROMPTS * K and r.judged + r.failed_judgements == PROMPTS * K >= 5000, r
        assert r.judged >= 5000 and not r.early_stopped
    assert len(score_objects) >= ROUNDS * (PROMPTS * K // 250)  # the scores live in S3, one object per batch
    assert 0 < largest < KV_BOUND, largest
    # a client reading the state right after the terminal event sees it (saved before it was published)
    assert state.done and state.outcome == "max_rounds" and len(state.rounds) == ROUNDS
