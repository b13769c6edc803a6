"""The stage split of a migration from its events: each event's reported work laid back to back before it was
published, overlaps shared, uncovered wall time is bus/idle; shares add up to the wall time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    JudgeItem,
    JudgeRequest,
    MigrationCompleted,
    Subject,
    TrainDone,
    WorkTime,
    start_envelope,
)
from llamaduo.reporting.timeline import IDLE, describe_split, stage_split, work_spans

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ADAPTER = ArtifactRef(key="migrations/m-x/round-0/adapter")


def at(env, seconds: float):  # type: ignore[no-untyped-def]
    return env.model_copy(update={"occurred_at": T0 + timedelta(seconds=seconds)})


def migration() -> list:
    start = at(start_envelope("m-x", {}), 0)
    item = JudgeItem(item_id="a", instruction="q", reference="r", candidate="c")
    return [
        start,
        # trainer: 2 s other (reads), 3 s load, 10 s train, published at 16 -> 1..16; 0..1 idle
        at(start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ADAPTER, rows=4, work=WorkTime(
            other=2, load=3, train=10))), 16),
        # a shard: load 2 + generate 6, published at 26 -> 18..26; 16..18 idle
        at(start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=0, batches=2, items=[item], work=WorkTime(
            load=2, generate=6))), 26),
        at(start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=1, batches=2, items=[item])), 26),
        # judging 22..26, beside generation: 4 s shared half and half
        at(start.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=2, scores=[], work=WorkTime(judge=4))), 26),
        at(start.follow(Subject.MIGRATION_COMPLETED, MigrationCompleted(model=ADAPTER, best_round=0, rounds=[])), 30),
    ]


def test_the_split_lays_each_event_s_work_before_it_and_shares_overlaps() -> None:
    split = stage_split(migration())
    assert split.wall_seconds == 30
    assert split.seconds["other"] == 2 and split.seconds["load"] == 5 and split.seconds["train"] == 10
    assert split.seconds["generate"] == 2 + 4 / 2  # 20..22 alone (after its 2 s load), 22..26 beside judging
    assert split.seconds["judge"] == 2
    assert split.seconds[IDLE] == 1 + 2 + 4  # before training, between train.done and the shard, after judging
    assert split.overlap_seconds == 4
    assert split.busy_seconds["generate"] == 6 and split.busy_seconds["judge"] == 4
    assert sum(split.seconds.values()) == pytest.approx(split.wall_seconds)
    assert split.idle_share == pytest.approx(7 / 30, abs=1e-4)
    assert describe_split(split).startswith("30 s from start to end: train 33.3%, bus/idle 23.3%")


def test_events_without_work_add_no_span_and_an_unfinished_migration_has_no_split() -> None:
    events = migration()
    assert [s.stage for s in work_spans(events)] == ["other", "load", "train", "load", "generate", "judge"]
    with pytest.raises(ValueError, match="terminal event"):
        stage_split(events[:-1])
