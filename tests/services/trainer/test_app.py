"""Trainer and inference app helpers against a real S3 server (no bus): checkpoints that survive the
machine, and predictions shards that a redelivered request reuses."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.bus.broker import WorkReturned
from llamaduo.contracts.events import JudgeItem, TrainProgress
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.models.loading import STUDENT_META_FILE
from llamaduo.services.inference.shards import predict_in_shards, predict_round
from llamaduo.services.trainer.checkpoints import (
    CheckpointUploader,
    forget_checkpoints,
    local_checkpoint_step,
    remote_checkpoint_step,
    restore_checkpoint,
)
from llamaduo.services.trainer.rounds import train_round
from llamaduo.storage.keys import checkpoint_prefix, predictions_key, shard_key
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
ROWS = make_dataset(n_train=8, n_test=5)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
TEST = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
        if r["split"] == "test"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def migration_spec(epochs: float = 4) -> MigrationSpec:
    return MigrationSpec.model_validate({
        "task": {"name": "triage", "system_prompt": SYSTEM, "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": "unused.jsonl"},
        "student": {"base_model": "tiny:llama", "method": "full",
                    "training": {"epochs": epochs, "learning_rate": 3e-3, "batch_size": 4, "max_length": 128},
                    "inference": {"max_new_tokens": 4, "samples_per_prompt": 2, "batch_size": 4,
                                  "temperature": 0.7}},
    })


def mid() -> str:
    return "m" + uuid.uuid4().hex[:10]


def test_checkpoint_in_s3_resumes_on_an_empty_machine(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec, migration = migration_spec(), mid()  # 8 rows, batch 4, 4 epochs: 8 steps
    prefix = checkpoint_prefix(migration, 0)

    def killer(info: TrainProgress) -> None:
        if info.step >= 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_round(store, spec, TRAIN, migration, 0, tmp_path / "machine-a", progress=killer, every_s=0)
    # a checkpoint after every step; the newest one (step 4, saved before the kill at step 5) is in S3, alone
    assert remote_checkpoint_step(store, prefix) == 4
    assert {k.split("/")[5] for k in store.list(prefix + "/") if not k.endswith("_index.json")} == {"checkpoint-4"}

    # another machine: nothing local, the checkpoint comes from S3 and training goes on from step 5
    steps: list[int] = []
    result, adapter = train_round(store, spec, TRAIN, migration, 0, tmp_path / "machine-b",
                                  progress=lambda i: steps.append(i.step), every_s=0)
    assert result.steps == 8
    assert min(steps) == 5 and steps[-1] == 8  # resumed, not restarted
    assert store.exists(f"{adapter.key}/{STUDENT_META_FILE}")
    assert remote_checkpoint_step(store, prefix) in (5, 6, 7)  # copied during the resumed run
    forget_checkpoints(store, prefix)
    assert store.list(prefix + "/") == []


def test_restore_takes_only_a_newer_checkpoint(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = checkpoint_prefix(mid(), 1)
    assert restore_checkpoint(store, prefix, tmp_path / "ckpt") is None  # nothing stored
    src = tmp_path / "trainer-out"
    for step in (3, 6):
        (src / f"checkpoint-{step}").mkdir(parents=True)
        (src / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    uploader = CheckpointUploader(store, prefix, tmp_path / "staging")
    uploader(src / "checkpoint-3")
    shutil.rmtree(src / "checkpoint-3")  # the trainer rotates it away: the staged hard links survive
    uploader(src / "checkpoint-6")
    uploader.close(flush=True)
    assert uploader.uploaded[-1] == "checkpoint-6" and remote_checkpoint_step(store, prefix) == 6

    local = tmp_path / "ckpt"
    (local / "checkpoint-7").mkdir(parents=True)
    assert restore_checkpoint(store, prefix, local) is None  # local is ahead: kept
    assert local_checkpoint_step(local) == 7
    shutil.rmtree(local / "checkpoint-7")
    (local / "checkpoint-2").mkdir()
    assert restore_checkpoint(store, prefix, local) == 6  # S3 is ahead: replaces the local one
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint-6"]
    assert (local / "checkpoint-6" / "trainer_state.json").read_text() == '{"global_step": 6}'
    assert not (tmp_path / "ckpt.restoring").exists()


def test_inference_reuses_stored_shards(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec, migration = migration_spec(epochs=1), mid()
    _, adapter = train_round(store, spec, TRAIN, migration, 0, tmp_path / "train", every_s=3600)
    # shard 1 (prompts 2-3, shard size 2) is already there, from a crashed earlier delivery: marked
    marked = [JudgeItem(item_id=e.id, sample=k, instruction=e.instruction, reference=e.response, candidate="MARK")
              for e in TEST[2:4] for k in range(2)]
    store.put_jsonl(shard_key(migration, 0, 1), marked)
    # a stale shard 2 (another test split) is not taken
    store.put_jsonl(shard_key(migration, 0, 2), [marked[0]])

    items, ref = predict_round(store, spec, TEST, migration, 0, adapter.key, tmp_path / "model", shard_size=2)
    assert [(i.item_id, i.sample) for i in items] == [(e.id, k) for e in TEST for k in range(2)]
    assert [i.candidate for i in items[4:8]] == ["MARK"] * 4  # reused, not regenerated
    assert "MARK" not in {i.candidate for i in items[:4] + items[8:]}
    assert all(store.exists(shard_key(migration, 0, i)) for i in range(3))
    assert ref.key == predictions_key(migration, 0) and ref.rows == len(TEST) * 2
    assert [JudgeItem.model_validate(r) for r in store.iter_jsonl(ref.key)] == items

    # redelivered once more: every shard is there, nothing is generated and no model is loaded
    def no_model(prompts: list[str], should_stop: object = None) -> list[list[str]]:
        raise AssertionError("a stored shard was regenerated")

    again, generated = predict_in_shards(store, TEST, migration, 0, no_model, 2, shard_size=2)
    assert generated == 0 and again == items


def test_inference_stop_request_keeps_the_stored_shards(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    migration = mid()
    calls: list[list[str]] = []

    def answer(prompts: list[str], should_stop: object = None) -> list[list[str]]:
        calls.append(prompts)
        return [[f"answer to {p}"] for p in prompts]

    with pytest.raises(WorkReturned, match="stopped before shard 1"):
        predict_in_shards(store, TEST, migration, 0, answer, 1, shard_size=2, should_stop=lambda: bool(calls))
    assert len(calls) == 1 and store.exists(shard_key(migration, 0, 0))
    assert not store.exists(shard_key(migration, 0, 1))
    items, generated = predict_in_shards(store, TEST, migration, 0, answer, 1, shard_size=2)
    assert generated == len(calls) - 1 == (len(TEST) + 1) // 2 - 1  # the stored shard was not redone
    assert [i.item_id for i in items] == [e.id for e in TEST]
