"""A cancelled migration's training stops after its current step and its inference before its next shard:
nothing of it is written to the store afterwards (real S3 server, tiny student)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import TrainProgress
from llamaduo.services.inference.shards import predict_in_shards
from llamaduo.services.trainer.rounds import train_round
from llamaduo.storage.keys import migration_key, shard_key
from tests.services.trainer.test_app import TEST, TRAIN, mid, migration_spec, tiny_cache  # noqa: F401


def test_training_stops_after_the_step_that_saw_the_cancel_and_uploads_nothing(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    migration = mid()
    steps: list[int] = []
    asked: list[int] = []

    def progress(info: TrainProgress) -> None:
        steps.append(info.step)

    with pytest.raises(MigrationCancelled, match="training cancelled at step 2"):  # asked after every step
        train_round(store, migration_spec(epochs=4), TRAIN, migration, 0, tmp_path / "work", progress=progress,
                    every_s=3600, should_cancel=lambda: asked.append(1) or len(asked) >= 2)
    assert max(steps, default=0) <= 2  # of 8 steps planned
    assert store.list(migration_key(migration) + "/") == []  # no checkpoint saved for the cancel, no adapter


def test_inference_stops_before_the_next_shard_and_stores_nothing_more(store) -> None:  # type: ignore[no-untyped-def]
    migration = mid()
    calls: list[list[str]] = []
    cancelled: list[bool] = []

    def answer(prompts: list[str], should_stop: object = None) -> list[list[str]]:
        calls.append(prompts)
        if len(calls) == 2:
            cancelled.append(True)  # the cancel lands while shard 1 is being answered
        return [[f"answer to {p}"] for p in prompts]

    with pytest.raises(MigrationCancelled, match="shard 1 answered, not stored"):
        predict_in_shards(store, TEST, migration, 0, answer, 1, shard_size=2, should_cancel=lambda: bool(cancelled))
    assert len(calls) == 2 and store.exists(shard_key(migration, 0, 0))
    assert not store.exists(shard_key(migration, 0, 1))
