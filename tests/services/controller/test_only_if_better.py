"""``promotion.only_if_better``: a migration's model is promoted only if it beats the route's current version on
the same eval split. The domain (no NATS, no S3) decides; with a real nats-server and S3 server the controller
copies the current version's adapter under the migration's prefix, asks for the baseline with the copy, and
changes the route only when the new model is strictly better."""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import uuid
from pathlib import Path

import pytest
from support.bus import Recorder, controller

from llamaduo.bus.broker import Bus
from llamaduo.cli import installation
from llamaduo.cli.migrate import print_table, summary
from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    InferRequest,
    MigrationCancel,
    MigrationCompleted,
    MigrationFailed,
    Score,
    Stage,
    Subject,
    TrainDone,
    Usage,
    start_envelope,
)
from llamaduo.contracts.routes import promote
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs
from llamaduo.errors import StoreError
from llamaduo.services.controller import domain
from llamaduo.services.controller.ending import awaiting_baseline_lookup, begin_baseline
from llamaduo.storage.keys import (
    answered_data_key,
    baseline_adapter_key,
    batch_scores_key,
    data_key,
    migration_key,
)
from llamaduo.storage.store import ArtifactStore
from tests.services.controller.test_domain import SPEC, kinds, score_round
from tests.services.controller.test_promotion import capture, read_route, spec_for, write_route

ROUTE = "triage"
BETTER_ONLY = {**SPEC, "promotion": {"route": ROUTE, "mode": "full", "only_if_better": True}}
DATA = DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                test=ArtifactRef(key="s", rows=4))
COPY = ArtifactRef(key="migrations/m-1/round-0/baseline/adapter", sha256="ab" * 32)


def passed(spec=BETTER_ONLY, data=DATA, sims=(95, 95, 95, 95)):
    """A migration whose round 0 passes the gate (similarity_mean 95 >= 90); returns its start, state, outputs."""
    start = start_envelope("m-1", spec)
    state, _ = domain.start(start, parse_spec(spec), data)
    return start, state, score_round(state, start, 0, list(sims))


def baseline_scored(request, batch, sims, batches=2):
    """The judge's reply to baseline batch ``batch`` of the infer.request ``request``."""
    scores = [Score(item_id=f"i{batch}-{j}", similarity=s, precision=s) for j, s in enumerate(sims)]
    return request.follow(Subject.EVAL_SCORED, EvalScored(batch=batch, batches=batches, scores=scores,
                                                          usage=Usage(calls=len(sims)), split="baseline"),
                          key=f"baseline-{batch}")


def judged_baseline(sims_by_batch):
    """Pass round 0, find the route's current version m-old, and judge its baseline; the last outputs."""
    start, state, out = passed()
    assert out == [] and state.stage == Stage.BASELINE and awaiting_baseline_lookup(state)
    out = begin_baseline(state, start, "m-old", COPY)
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    for b, sims in enumerate(sims_by_batch):
        out = domain.on_eval_scored(state, baseline_scored(request, b, sims, batches=len(sims_by_batch)))
    return state, out


def test_the_spec_field_is_off_by_default_and_documented():
    spec = parse_spec({**SPEC, "promotion": {"route": ROUTE}})
    assert spec.promotion.only_if_better is False
    assert "strictly greater" in type(spec.promotion).model_fields["only_if_better"].description


def test_passing_asks_for_the_current_version_then_judges_it_on_the_eval_split_with_the_copy():
    start, state, out = passed()
    assert out == [] and not state.done  # nothing published until the route was looked up (bus adapter)
    out = begin_baseline(state, start, "m-old", COPY)
    assert kinds(out) == [Subject.INFER_REQUEST]
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    assert isinstance(request.payload, InferRequest) and request.payload.split == "baseline"
    assert request.payload.adapter == COPY and request.round == 0
    assert state.baseline.to_judge == 4 and state.ending
    assert begin_baseline(state, start, "m-old", COPY) == []  # looked up once


def test_a_better_model_is_promoted_and_both_scores_are_recorded():
    state, out = judged_baseline([[80, 80], [70, 90]])
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    done = out[-1].payload
    assert isinstance(done, MigrationCompleted) and done.promotion == "promoted" and done.model.key == "a0"
    assert done.baseline.version == "m-old" and done.baseline.score == 80.0 and done.baseline.adapter == COPY
    assert (done.baseline.judged, done.baseline.to_judge) == (4, 4)
    assert "95.0" in done.promotion_detail and "80.0" in done.promotion_detail
    assert state.promotion == "promoted" and state.stage == Stage.COMPLETED
    assert done.usage.calls == state.usage.calls and state.usage.calls >= 4  # baseline judging is counted


@pytest.mark.parametrize("sims", [[95, 95], [99, 99]], ids=["equal", "worse"])
def test_a_model_that_does_not_beat_the_current_version_completes_but_keeps_the_route(sims):
    state, out = judged_baseline([sims, sims])
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]  # the migration still completes, its model kept
    done = out[-1].payload
    assert done.promotion == "kept_current" and done.model.key == "a0"
    assert "not better" in done.promotion_detail and f"{sims[0]:.1f}" in done.promotion_detail
    assert state.promotion == "kept_current" and state.outcome == "completed"


def test_without_a_current_version_the_model_is_promoted_without_a_baseline():
    start, state, _ = passed()
    out = begin_baseline(state, start, None, None)
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    assert not [o for o in out if o.type == Subject.MIGRATION_PROGRESS]  # no baseline stage shown
    done = out[-1].payload
    assert done.promotion == "promoted" and done.baseline is None and "no current version" in done.promotion_detail


def test_a_current_version_whose_adapter_cannot_be_copied_is_kept():
    start, state, _ = passed()
    out = begin_baseline(state, start, "m-old", None, note="its adapter 'x' could not be copied: no index")
    done = out[-1].payload
    assert done.promotion == "kept_current" and done.baseline.version == "m-old" and done.baseline.adapter is None
    assert "no index" in done.promotion_detail and not [o for o in out if o.type == Subject.INFER_REQUEST]


def test_without_only_if_better_there_is_no_baseline_stage():
    _, state, out = passed({**SPEC, "promotion": {"route": ROUTE, "mode": "full"}})
    assert kinds(out) == [Subject.MIGRATION_COMPLETED] and out[-1].payload.promotion == "promoted"
    assert state.baseline is None
    _, _, out = passed(SPEC)
    assert out[-1].payload.promotion == "none"


def test_the_holdout_comes_first_and_its_batches_are_not_the_baselines():
    data = DataRefs(**{**DATA.model_dump(), "holdout": {"key": "h", "rows": 2}})
    start, state, out = passed(data=data)
    [holdout] = [o for o in out if o.type == Subject.INFER_REQUEST]
    assert holdout.payload.split == "holdout" and state.stage == Stage.HOLDOUT
    scores = [Score(item_id="h0", similarity=10, precision=10), Score(item_id="h1", similarity=10, precision=10)]
    out = domain.on_eval_scored(state, holdout.follow(Subject.EVAL_SCORED, EvalScored(
        batch=0, batches=1, scores=scores, split="holdout"), key="h0"))
    assert out == [] and state.stage == Stage.BASELINE  # holdout done: now the route is looked up
    out = begin_baseline(state, start, "m-old", COPY)
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    domain.on_eval_scored(state, baseline_scored(request, 0, [50, 50, 50, 50], batches=1))
    done = state.rounds[0].summary
    assert done.holdout_aggregates["similarity_mean"] == 10.0 and state.baseline.stats.judged == 4
    assert state.promotion == "promoted"


def test_a_redelivered_baseline_batch_counts_once_and_the_outcome_is_the_same_on_a_rerun():
    start, state, _ = passed()
    [request] = [o for o in begin_baseline(state, start, "m-old", COPY) if o.type == Subject.INFER_REQUEST]
    first = baseline_scored(request, 0, [80, 80])
    domain.on_eval_scored(state, first)
    assert domain.on_eval_scored(state, first) == [] and state.baseline.received_count == 1
    last = baseline_scored(request, 1, [80, 80])
    again = copy.deepcopy(state)
    out = domain.on_eval_scored(state, last)
    assert [o.event_id for o in domain.on_eval_scored(again, last)] == [o.event_id for o in out]
    assert domain.on_eval_scored(state, last) == []


def test_cancel_during_the_baseline_ends_cancelled_without_promotion():
    start, state, _ = passed()
    begin_baseline(state, start, "m-old", COPY)
    out = domain.cancel(state, start.follow(Subject.MIGRATION_CANCEL, MigrationCancel(requested_by="ada@host")))
    failed = out[-1].payload
    assert isinstance(failed, MigrationFailed) and failed.reason == "cancelled" and failed.best_model.key == "a0"
    assert state.stage == Stage.CANCELLED and state.promotion is None


def test_baseline_work_dead_lettered_completes_without_promoting():
    start, state, _ = passed()
    begin_baseline(state, start, "m-old", COPY)
    out = domain.fail(state, start, "dead_letter", "infer.request dead-lettered by inference: out of memory")
    done = out[-1].payload
    assert isinstance(done, MigrationCompleted) and done.promotion == "kept_current"
    assert "not judged in full" in done.promotion_detail and "out of memory" in done.baseline.note


def test_the_cli_shows_why_the_route_kept_its_version(monkeypatch, capsys):
    state, out = judged_baseline([[99, 99], [99, 99]])
    table = io.StringIO()
    s = summary("m-1", out[-1])
    print_table(s, table)
    assert s["promotion"] == "kept_current" and s["baseline_score"] == 99.0
    assert "promotion: kept_current: similarity_mean 95.0 (round 0) vs the current version m-old's 99.0" in (
        " ".join(table.getvalue().split()))

    async def states(settings, migration_id):
        return [state]

    monkeypatch.setattr("llamaduo.bus.client.list_states", states)
    monkeypatch.setattr(installation, "load_settings", lambda: None)
    assert installation.cmd_status(argparse.Namespace(id="m-1", json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "m-1: completed (round 0) completed, kept_current"
    assert lines[1].startswith("  promotion: kept_current: similarity_mean 95.0")
    assert installation.cmd_status(argparse.Namespace(id="m-1", json=True)) == 0
    assert json.loads(capsys.readouterr().out)[0]["promotion"] == "kept_current"


# ------------------------------------------------------------------- real nats-server and S3 server


def old_adapter(store: ArtifactStore, tmp_path: Path) -> ArtifactRef:
    """The route's current version's adapter, stored by another migration (m-old)."""
    folder = tmp_path / "old-adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01old weights")
    return store.put_dir(migration_key("m-old", "round-2", "adapter"), folder, once=True)


def test_the_baseline_answers_the_eval_split_and_stores_its_work_apart():
    assert answered_data_key("m-1", "baseline") == answered_data_key("m-1", "eval") == data_key("m-1", "test")
    assert answered_data_key("m-1", "holdout") == data_key("m-1", "holdout")
    assert batch_scores_key("m-1", 0, 3, "baseline") == "migrations/m-1/round-0/baseline/scores/batch-00003.jsonl"
    assert baseline_adapter_key("m-1", 0) == "migrations/m-1/round-0/baseline/adapter"


def test_the_copy_is_write_once_and_a_malformed_source_is_refused(store, tmp_path):
    source = old_adapter(store, tmp_path)
    target = baseline_adapter_key("m-copy", 0)
    ref = store.copy_dir(source.key, target)
    assert ref == ArtifactRef(key=target, sha256=source.sha256)
    assert store.copy_dir(source.key, target) == ref  # a redelivery copies nothing new
    assert store.stored_sha256(f"{target}/sub/weights.bin") == store.stored_sha256(f"{source.key}/sub/weights.bin")
    with pytest.raises(StoreError, match=r"'\.\.' parts"):
        store.copy_dir("migrations/m-old/../m-x/adapter", target)


async def run_only_if_better(settings, store, tmp_path, baseline_sims: list[int] | None, route_state=True,
                             adapter_key: str | None = None):
    """Run a migration with only_if_better to its end on ``route`` (current version m-old with its stored adapter,
    or ``adapter_key``; none unless ``route_state``); the baseline (if asked) scores ``baseline_sims``. Returns
    (recorder, route, old ref, migration id)."""
    route = "triage-" + uuid.uuid4().hex[:6]
    mid = "m-new-" + uuid.uuid4().hex[:6]
    capture(store, route, 20)
    old = old_adapter(store, tmp_path)
    if route_state:
        await write_route(settings, route, promote(None, "m-old", "full", local_model="triage-old",
                                                   adapter_key=adapter_key or old.key))
    spec = spec_for(route, promotion={"route": route, "mode": "full", "only_if_better": True})
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "player")
        await player.broker.connect()
        try:
            await player.emit(start_envelope(mid, spec))
            [req] = await rec.wait_for(Subject.TRAIN_REQUEST, 0)
            await player.emit(req.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key=f"a-{mid}"), rows=16)))
            await player.emit(req.follow(Subject.INFER_DONE, InferDone(predictions=ArtifactRef(key="p0"), prompts=4,
                                                                       samples_per_prompt=1, batches=1)))
            await player.emit(req.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=1, scores=[
                Score(item_id=f"i{j}", similarity=95, precision=95) for j in range(4)]), key="b0"))
            if baseline_sims is not None:
                [ask] = await rec.wait_for(Subject.INFER_REQUEST)
                await player.emit(ask.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=1, split="baseline",
                    scores=[Score(item_id=f"i{j}", similarity=s, precision=s) for j, s in enumerate(baseline_sims)]),
                    key="baseline-0"))
            await rec.wait_for(Subject.MIGRATION_COMPLETED)
        finally:
            await ctl.broker.stop()
            await player.broker.stop()
    return rec, route, old, mid


async def test_a_better_model_is_promoted_after_judging_a_verified_copy_of_the_current_adapter(
        settings, store, tmp_path):
    rec, route, old, mid = await run_only_if_better(settings, store, tmp_path, [80, 80, 80, 80])
    [ask] = rec.of(Subject.INFER_REQUEST)
    copied = ask.payload.adapter
    assert ask.payload.split == "baseline" and copied.key == baseline_adapter_key(mid, 0)
    assert copied.sha256 == old.sha256  # the index, copied as it was: its sha256 recorded like any artifact
    got = store.get_ref_dir(mid, copied, tmp_path / "got")  # the migration's own key; every file's hash checked
    assert (got / "sub" / "weights.bin").read_bytes() == b"\x00\x01old weights"
    [done] = rec.of(Subject.MIGRATION_COMPLETED)
    assert done.payload.promotion == "promoted" and done.payload.baseline.score == 80.0
    [changed] = await rec.wait_for(Subject.ROUTE_CHANGED)
    state = await read_route(settings, route)
    assert state.version == mid == changed.payload.version and [h.version for h in state.history] == ["m-old"]


async def test_a_model_no_better_completes_and_the_route_keeps_its_version(settings, store, tmp_path):
    rec, route, old, _ = await run_only_if_better(settings, store, tmp_path, [95, 95, 95, 95])
    [done] = rec.of(Subject.MIGRATION_COMPLETED)
    assert done.payload.promotion == "kept_current" and "not better" in done.payload.promotion_detail
    await asyncio.sleep(0.5)  # route.changed would follow migration.completed out of the same outbox
    assert not rec.of(Subject.ROUTE_CHANGED)
    state = await read_route(settings, route)
    assert state.version == "m-old" and state.adapter_key == old.key and state.history == []


async def test_a_route_without_a_current_version_is_promoted_without_a_baseline(settings, store, tmp_path):
    rec, route, _, mid = await run_only_if_better(settings, store, tmp_path, None, route_state=False)
    assert not rec.of(Subject.INFER_REQUEST)
    [done] = rec.of(Subject.MIGRATION_COMPLETED)
    assert done.payload.promotion == "promoted" and done.payload.baseline is None
    await rec.wait_for(Subject.ROUTE_CHANGED)
    assert (await read_route(settings, route)).version == mid


async def test_a_current_adapter_that_cannot_be_copied_keeps_the_route_without_failing_the_migration(
        settings, store, tmp_path):
    rec, route, _, _ = await run_only_if_better(settings, store, tmp_path, None,
                                                adapter_key="migrations/m-old/round-9/adapter")
    assert not rec.of(Subject.INFER_REQUEST)
    [done] = rec.of(Subject.MIGRATION_COMPLETED)
    assert done.payload.promotion == "kept_current" and "could not be copied" in done.payload.baseline.note
    assert done.payload.baseline.adapter is None and "round-9/adapter/_index.json" in done.payload.promotion_detail
    await asyncio.sleep(0.5)
    assert not rec.of(Subject.ROUTE_CHANGED) and (await read_route(settings, route)).version == "m-old"
