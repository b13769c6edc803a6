"""The inference service between rounds: a shard of a round whose judging the controller closed is not answered,
and the holdout is answered with the student the worker already holds for the round (not loaded again); the
work behind each shard's answers rides on its first judge.request (:class:`WorkTime`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from faststream.nats import TestNatsBroker

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import (
    ArtifactRef,
    InferRequest,
    InferShard,
    Subject,
    parse_event,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.data.examples import Example
from llamaduo.services.inference.app import register
from llamaduo.services.trainer.domain import train
from llamaduo.storage.keys import data_key, judging_closed_key, round_key, shard_key, spec_key
from llamaduo.tasks.triage import make_dataset

SPEC = parse_spec({
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle", "system_prompt": "Route the ticket."},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full",
                "training": {"epochs": 1, "batch_size": 8, "max_length": 96},
                "inference": {"max_new_tokens": 4, "batch_size": 8}},
    "judge": {"method": "programmatic", "checker": "exact", "batch_size": 4},
})
ROWS = make_dataset(n_train=16, n_test=12, seed=1)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
TEST = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
        if r["split"] == "test"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("student")
        train(SPEC.student, TRAIN, SPEC.task.system_prompt, out)
        yield out


def shard(adapter: ArtifactRef, ids: list[str]) -> InferShard:
    return InferShard(adapter=adapter, shard=0, shards=1, prompt_ids=ids, first_batch=0,
                      shard_batches=-(-len(ids) // 4), batches=-(-len(ids) // 4))


async def test_a_shard_of_a_closed_round_is_not_answered(settings: Any, store: Any, student_dir: Path) -> None:
    mid = "m-closed-shard"
    store.put_json(spec_key(mid), SPEC.model_dump(mode="json"))
    store.put_jsonl(data_key(mid, "test"), TEST)
    adapter = store.put_dir(round_key(mid, 0, "adapter"), student_dir)
    bus = Bus(settings, "inference")
    register(bus, store)
    start = start_envelope(mid, {})
    ids = [e.id for e in TEST]
    answered = start.follow(Subject.INFER_SHARD, shard(adapter, ids[:6]), key="open")
    skipped = start.follow(Subject.INFER_SHARD, shard(adapter, ids[6:]).model_copy(update={"shard": 1}), key="closed")
    async with TestNatsBroker(bus.broker) as broker:
        await broker.publish(answered.to_bytes(), settings.subject(Subject.INFER_SHARD))
        store.put_json(judging_closed_key(mid, 0), {"round": 0})  # then the controller closes round 0 early
        await broker.publish(skipped.to_bytes(), settings.subject(Subject.INFER_SHARD))
        mock = bus.publisher(Subject.JUDGE_REQUEST).mock
        assert mock is not None
        requests = [parse_event(call.args[0]) for call in mock.call_args_list]
    assert {i.item_id for r in requests for i in r.payload.items} == set(ids[:6])  # only the open one's answers
    assert store.exists(shard_key(mid, 0, 0)) and not store.exists(shard_key(mid, 0, 1))


async def test_the_holdout_is_answered_by_the_student_held_for_the_round(
        settings: Any, store: Any, student_dir: Path) -> None:
    mid = "m-held-student"
    store.put_json(spec_key(mid), SPEC.model_dump(mode="json"))
    store.put_jsonl(data_key(mid, "test"), TEST)
    store.put_jsonl(data_key(mid, "holdout"), TRAIN[:5])
    adapter = store.put_dir(round_key(mid, 0, "adapter"), student_dir)
    bus = Bus(settings, "inference")
    register(bus, store)
    start = start_envelope(mid, {})
    answer = start.follow(Subject.INFER_SHARD, shard(adapter, [e.id for e in TEST]), key="s")
    holdout = start.follow(Subject.INFER_REQUEST, InferRequest(adapter=adapter, split="holdout"), key="h")
    async with TestNatsBroker(bus.broker) as broker:
        await broker.publish(answer.to_bytes(), settings.subject(Subject.INFER_SHARD))
        await broker.publish(holdout.to_bytes(), settings.subject(Subject.INFER_REQUEST))
        mock = bus.publisher(Subject.JUDGE_REQUEST).mock
        assert mock is not None
        requests = [parse_event(call.args[0]) for call in mock.call_args_list]
    first = {r.payload.split: r.payload.work for r in requests if r.payload.batch == 0}
    assert [r.payload.work is not None for r in requests if r.payload.split == "eval"] == [True, False, False]
    assert first["eval"].load > 0 and first["eval"].generate > 0  # the round's student loaded, then answering
    assert first["holdout"].load == 0 and first["holdout"].generate > 0  # held: answered without a load
    assert sum(len(r.payload.items) for r in requests if r.payload.split == "holdout") == 5
