"""The controller service over a real nats-server and S3 server, other services played by the test."""

from __future__ import annotations

import asyncio
import json

import pytest
from support.bus import Recorder, controller

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    Score,
    Subject,
    TrainDone,
    start_envelope,
)
from llamaduo.storage.store import ArtifactStore
from llamaduo.tasks.triage import make_dataset


def spec_for(path: str, **over) -> dict:
    spec = {
        "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": path},
        "student": {"base_model": "tiny:llama", "method": "full"},
        "judge": {"threshold": 90, "batch_size": 5},
        "budget": {"max_rounds": 3},
    }
    spec.update(over)
    return spec


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "triage.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_dataset(n_train=12, n_test=4, seed=2)))
    return str(p)


async def test_restarted_controller_rebuilds_state_and_duplicates_start_nothing(settings, dataset):
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        start = start_envelope("m-restart", spec_for(dataset))
        player = Bus(settings, "player")
        await player.broker.connect()
        await player.emit(start)
        await player.emit(start_envelope("m-restart", spec_for(dataset), event_id="another-id"))
        [req] = await rec.wait_for(Subject.TRAIN_REQUEST, 0)
        assert req.payload.rows == 12
        await ctl.broker.stop()  # controller gone; its state lives in JetStream KV

        await player.emit(req.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a0"), rows=12)))
        await player.emit(req.follow(Subject.INFER_DONE, InferDone(
            predictions=ArtifactRef(key="p0"), prompts=4, samples_per_prompt=1, batches=2)))
        for b in range(2):
            scored = EvalScored(batch=b, batches=2, scores=[
                Score(item_id=f"i{b}{j}", similarity=40, precision=40) for j in range(2)])
            await player.emit(req.follow(Subject.EVAL_SCORED, scored, key=f"b{b}"))
        await player.emit(req.follow(Subject.EVAL_SCORED, scored, key="b1-redelivered"))

        ctl = await controller(settings)  # a new process: state from KV, events from its durable consumers
        [synth] = await rec.wait_for(Subject.SYNTH_REQUEST, 1)
        assert synth.causation_id is not None
        await asyncio.sleep(0.5)
        await ctl.broker.stop()
        await player.broker.stop()
    assert len(rec.of(Subject.TRAIN_REQUEST, 0)) == 1  # the second start began nothing
    assert len(rec.of(Subject.SYNTH_REQUEST)) == 1  # the redelivered batch closed nothing twice
    store = ArtifactStore(settings)
    manifest = store.get_json("migrations/m-restart/manifest.json")
    assert manifest["rounds"][0]["summary"]["judged"] == 4
    assert manifest["rounds"][0]["summary"]["aggregates"]["similarity_mean"] == 40
    assert manifest["data"]["test"]["rows"] == 4 and len(manifest["data"]["test"]["sha256"]) == 64


async def test_bad_spec_and_bad_data_fail_before_anything_starts(settings, dataset, tmp_path):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"instruction": "x", "response": "y", "split": "train"}\n{"instruction": ""}\n')
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "player")
        await player.broker.connect()
        await player.emit(start_envelope("m-badspec", {**spec_for(dataset), "judge": {"threshold": 500}}))
        await player.emit(start_envelope("m-baddata", spec_for(str(bad_rows))))
        await rec.wait_for(Subject.MIGRATION_FAILED, count=2)
        await ctl.broker.stop()
        await player.broker.stop()
    failed = {e.migration_id: e.payload for e in rec.of(Subject.MIGRATION_FAILED)}
    assert failed["m-badspec"].reason == "spec" and "judge.threshold" in failed["m-badspec"].detail
    assert failed["m-baddata"].reason == "dataset" and "row 2" in failed["m-baddata"].detail
    assert not rec.of(Subject.TRAIN_REQUEST)


async def test_dead_lettered_work_fails_the_migration_with_reason(settings, dataset):
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "trainer")
        await player.broker.connect()
        await player.emit(start_envelope("m-dlq", spec_for(dataset)))
        [req] = await rec.wait_for(Subject.TRAIN_REQUEST, 0)
        await player.dead_letter(settings.subject("train.request"), req.to_bytes(), "error after 3 deliveries: OOM", 3)
        [failed] = await rec.wait_for(Subject.MIGRATION_FAILED)
        await ctl.broker.stop()
        await player.broker.stop()
    assert failed.payload.reason == "dead_letter"
    assert "OOM" in failed.payload.detail and "trainer" in failed.payload.detail


async def test_a_dead_lettered_start_fails_its_migration_with_the_validation_error(settings, dataset):
    """A client waiting on a migration whose start could not even be read learns why (no hang)."""
    from llamaduo.bus.client import list_states

    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "player")
        await player.broker.connect()
        body = start_envelope("m-bad-start", spec_for(dataset)).model_dump(mode="json")
        body["payload"] = {"spec": "not a mapping"}
        reason = "schema: 1 validation error for Envelope[MigrationStart]: payload.spec: Input should be a valid dict"
        await player.dead_letter(settings.subject("migration.start"), json.dumps(body).encode(), reason, 1)
        [failed] = await rec.wait_for(Subject.MIGRATION_FAILED)
        [state] = await list_states(settings, "m-bad-start")
        await ctl.broker.stop()
        await player.broker.stop()
    assert failed.migration_id == "m-bad-start" and failed.payload.reason == "spec"
    assert "payload.spec" in failed.payload.detail and "valid dict" in failed.payload.detail
    assert state is not None and state.outcome == "spec" and not state.outbox
