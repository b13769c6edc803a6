"""Inference bus adapter: ``train.done`` -> answer the test split -> predictions to S3 ->
``judge.request`` batches and ``infer.done``.

Predictions are generated and stored in shards of :data:`PROMPTS_PER_SHARD` prompts
(``round_key(mid, round, "predictions", "shard-00000.jsonl")``, ...); a shard already in S3 is reused, so a
request redelivered after a crash redoes at most one shard (and loads no model when every shard is there).
The shards are then joined into ``predictions.jsonl``, the file ``infer.done`` points at. The student is
loaded with the backend ``student.inference.backend`` picks (see ``load_generator`` in the domain module).

``migration.completed`` -> when the spec's ``serve.enabled`` is set, the migration's chosen model is served behind
the OpenAI-compatible API of :mod:`llamaduo.serving.server` (as ``llamaduo serve --migration`` would), from a thread of
this service, on ``serve.host:serve.port`` under ``serve.model_name`` (default: the migration id). Migrations
asking for the same address share one server: a later one adds its model, or replaces one of the same name. An
address already in use is logged as an error and the service goes on. With several inference replicas, one of
them (whichever takes the event) serves it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from llamaduo.bus.broker import Bus, Delivery, WorkReturned
from llamaduo.contracts.events import (
    ArtifactRef,
    InferDone,
    JudgeItem,
    JudgeRequest,
    MigrationCompletedEvent,
    Subject,
    TrainDoneEvent,
)
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.serving.server import BackgroundServer, fetch_migration_model, migration_defaults
from llamaduo.storage.keys import data_key, round_key
from llamaduo.storage.store import ArtifactStore, SpecCache

log = logging.getLogger("llamaduo.inference")

INFERENCE = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
SERVING = Delivery(max_deliver=2, ack_wait=60.0, backoff=(10.0,))
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
    items = store.read_models(key, JudgeItem)
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
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[JudgeItem], int]:
    """Answer ``test`` shard by shard, storing each shard as it is done and reusing stored ones.

    A stored shard is reused only when its items are those of its prompts (same ids, K each), so a changed
    test split or K regenerates it. Returns ``(items in test order, number of shards generated now)``.
    When ``should_stop()`` turns true (the service is shutting down) before a shard is generated,
    :class:`~llamaduo.bus.broker.WorkReturned` is raised: the shards stored so far are kept for the redelivery.
    """
    items: list[JudgeItem] = []
    generated = 0
    for index, start in enumerate(range(0, len(test), shard_size)):
        chunk = test[start:start + shard_size]
        key = shard_key(migration_id, round, index)
        stored = _stored_shard(store, key, [e.id for e in chunk for _ in range(samples_per_prompt)])
        if stored is None:
            if should_stop is not None and should_stop():
                raise WorkReturned(f"stopped before shard {index}; {index} shard(s) stored")
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
    model_dir: Path, *, shard_size: int = PROMPTS_PER_SHARD, should_stop: Callable[[], bool] | None = None,
) -> tuple[list[JudgeItem], ArtifactRef]:
    """Predictions of a round (sharded, see :func:`predict_in_shards`) joined into ``predictions.jsonl``."""

    def load() -> Answerer:
        from llamaduo.services.inference.domain import load_generator

        store.get_dir(adapter_key, model_dir)
        generator = load_generator(spec.student, model_dir)
        return lambda prompts: generator.generate(prompts, spec.task.system_prompt)

    k = spec.student.inference.samples_per_prompt
    items, _ = predict_in_shards(store, test, migration_id, round, lazy_answerer(load), k, shard_size=shard_size,
                                 should_stop=should_stop)
    return items, store.put_jsonl(predictions_key(migration_id, round), items)


#: Servers started after completions, by ``(host, port)`` as the specs ask for them.
Servers = dict[tuple[str, int], BackgroundServer]


def serve_completed(
    store: ArtifactStore, spec: MigrationSpec, migration_id: str, servers: Servers, cache: Path,
    *, model_key: str | None = None,
) -> BackgroundServer | None:
    """Serve a completed migration's chosen model as its spec's ``serve`` section asks (blocking: loads it).

    The model is fetched like ``llamaduo serve --migration`` does (``fetch_migration_model``;
    ``model_key``: the completion event's model) into ``cache``, then published on the server of
    ``(serve.host, serve.port)`` in ``servers`` (started on first use). Returns that server; None when the spec
    does not ask, or when the address is taken (logged as an error: the service goes on).
    """
    ask = spec.serve
    if not ask.enabled:
        return None
    name = ask.model_name or migration_id
    folder, _ = fetch_migration_model(store, migration_id, cache, model_key=model_key)
    server = servers.setdefault((ask.host, ask.port), BackgroundServer(ask.host, ask.port))
    try:
        replaced = server.publish({name: folder}, {name: migration_defaults(spec)})
    except OSError as err:
        log.error("cannot serve migration %s as %r on %s:%d: %s (is another server using that port? set "
                  "serve.port to a free one)", migration_id, name, ask.host, ask.port, err,
                  extra={"migration_id": migration_id})
        return None
    log.info("serving migration %s as %r on %s/v1%s", migration_id, name, server.url,
             " (replaced the model of that name)" if replaced else "", extra={"migration_id": migration_id})
    return server


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)
    servers: Servers = {}

    @bus.consumer(Subject.MIGRATION_COMPLETED, "inference-serve", SERVING)
    async def on_completed(event: MigrationCompletedEvent) -> None:
        """Serve the chosen model when the migration's spec asks (``serve.enabled``)."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        if not spec.serve.enabled:
            return
        await asyncio.to_thread(serve_completed, store, spec, event.migration_id, servers,
                                bus.settings.work_dir / "serving", model_key=event.payload.model.key or None)

    @bus.consumer(Subject.TRAIN_DONE, "inference", INFERENCE)
    async def on_train_done(event: TrainDoneEvent) -> None:
        """Generate K answers per test prompt with the new adapter and hand them to the judges."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        test = await asyncio.to_thread(
            store.read_models, data_key(event.migration_id, "test"), Example)
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}"
        items, predictions = await asyncio.to_thread(
            predict_round, store, spec, test, event.migration_id, event.round, event.payload.adapter.key, model_dir,
            should_stop=bus.stopping.is_set)
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
