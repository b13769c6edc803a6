"""Inference bus adapter: ``train.done`` -> answer the test split -> predictions to S3 ->
``judge.request`` batches and ``infer.done``.

Predictions are generated and stored in shards of :data:`PROMPTS_PER_SHARD` prompts
(``round_key(mid, round, "predictions", "shard-00000.jsonl")``, ...); a shard already in S3 is reused, so a
request redelivered after a crash redoes at most one shard (and loads no model when every shard is there).
The shards are then joined into ``predictions.jsonl``, the file ``infer.done`` points at.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from llamaduo.bus import Bus, Delivery
from llamaduo.contracts import ArtifactRef, InferDone, JudgeItem, JudgeRequest, Subject, TrainDoneEvent
from llamaduo.examples import Example
from llamaduo.spec import MigrationSpec
from llamaduo.store import ArtifactStore, SpecCache, data_key, round_key

INFERENCE = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
#: Test prompts per predictions shard (each shard holds K answers per prompt).
PROMPTS_PER_SHARD = 32

#: ``answer(prompts)`` -> K answers per prompt (a loaded :class:`StudentGenerator`'s ``generate``).
Answerer = Callable[[list[str]], list[list[str]]]


def shard_key(migration_id: str, round: int, index: int) -> str:
    return round_key(migration_id, round, "predictions", f"shard-{index:05d}.jsonl")


def predictions_key(migration_id: str, round: int) -> str:
    return round_key(migration_id, round, "predictions.jsonl")


def _stored_shard(store: ArtifactStore, key: str, expected_ids: list[str]) -> list[JudgeItem] | None:
    """The items of a stored shard, or None when it is absent or is not the shard of these prompts."""
    if not store.exists(key):
        return None
    items = [JudgeItem.model_validate(r) for r in store.iter_jsonl(key)]
    return items if [i.item_id for i in items] == expected_ids else None


def predict_in_shards(
    store: ArtifactStore,
    test: list[Example],
    migration_id: str,
    round: int,
    answer: Answerer,
    samples_per_prompt: int,
    *,
    shard_size: int = PROMPTS_PER_SHARD,
) -> tuple[list[JudgeItem], int]:
    """Answer ``test`` shard by shard, storing each shard as it is done and reusing stored ones.

    A stored shard is reused only when its items are those of its prompts (same ids, K each), so a changed
    test split or K regenerates it. Returns ``(items in test order, number of shards generated now)``.
    """
    items: list[JudgeItem] = []
    generated = 0
    for index, start in enumerate(range(0, len(test), shard_size)):
        chunk = test[start:start + shard_size]
        key = shard_key(migration_id, round, index)
        stored = _stored_shard(store, key, [e.id for e in chunk for _ in range(samples_per_prompt)])
        if stored is None:
            answers = answer([e.instruction for e in chunk])
            stored = [JudgeItem(item_id=e.id, sample=k, instruction=e.instruction, reference=e.response,
                                candidate=text)
                      for e, samples in zip(chunk, answers, strict=True) for k, text in enumerate(samples)]
            store.put_jsonl(key, stored)
            generated += 1
        items.extend(stored)
    return items, generated


def lazy_answerer(load: Callable[[], Answerer]) -> Answerer:
    """An :data:`Answerer` that calls ``load()`` (download and load the student) on its first use only."""
    loaded: list[Answerer] = []

    def answer(prompts: list[str]) -> list[list[str]]:
        if not loaded:
            loaded.append(load())
        return loaded[0](prompts)

    return answer


def predict_round(
    store: ArtifactStore, spec: MigrationSpec, test: list[Example], migration_id: str, round: int, adapter_key: str,
    model_dir: Path, *, shard_size: int = PROMPTS_PER_SHARD,
) -> tuple[list[JudgeItem], ArtifactRef]:
    """Predictions of a round (sharded, see :func:`predict_in_shards`) joined into ``predictions.jsonl``."""

    def load() -> Answerer:
        from llamaduo.services.inference.domain import StudentGenerator

        store.get_dir(adapter_key, model_dir)
        generator = StudentGenerator.load(spec.student, model_dir)
        return lambda prompts: generator.generate(prompts, spec.task.system_prompt)

    k = spec.student.inference.samples_per_prompt
    items, _ = predict_in_shards(store, test, migration_id, round, lazy_answerer(load), k, shard_size=shard_size)
    return items, store.put_jsonl(predictions_key(migration_id, round), items)


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    @bus.consumer(Subject.TRAIN_DONE, "inference", INFERENCE)
    async def on_train_done(event: TrainDoneEvent) -> None:
        """Generate K answers per test prompt with the new adapter and hand them to the judges."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        test = await asyncio.to_thread(
            lambda: [Example.model_validate(r) for r in store.iter_jsonl(data_key(event.migration_id, "test"))])
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}"
        items, predictions = await asyncio.to_thread(
            predict_round, store, spec, test, event.migration_id, event.round, event.payload.adapter.key, model_dir)
        # judged in a seeded random order: sequential early stopping assumes batches are random samples
        order = list(items)
        random.Random(f"{spec.dataset.seed}-{event.round}").shuffle(order)
        size = spec.judge.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        # infer.done first: the controller then knows the round's size before any score arrives
        await bus.emit(event.follow(Subject.INFER_DONE, InferDone(
            predictions=predictions, prompts=len(test), samples_per_prompt=spec.student.inference.samples_per_prompt,
            batches=len(batches)), key="infer"))
        for b, chunk in enumerate(batches):
            await bus.emit(event.follow(Subject.JUDGE_REQUEST,
                                        JudgeRequest(batch=b, batches=len(batches), items=chunk), key=f"judge-{b}"))
        shutil.rmtree(model_dir, ignore_errors=True)
