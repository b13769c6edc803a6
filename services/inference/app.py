"""Inference bus adapter.

* ``train.done`` -> answer the test split (:mod:`~llamaduo.services.inference.shards`, the student loaded with
  the backend ``student.inference.backend`` picks, see the domain module) -> predictions to S3 ->
  ``infer.done``, then the ``judge.request`` batches.
* ``migration.completed`` -> when the spec's ``serve.enabled`` is set, serve the migration's chosen model on
  ``serve.host:serve.port`` under ``serve.model_name`` (default: the migration id), from a thread of this
  service (:mod:`~llamaduo.services.inference.serve_after`). With several inference replicas, one of them
  (whichever takes the event) serves it.
* ``infer.request`` (split ``holdout``, sent once by the controller at the end) -> answer the holdout split with
  the chosen round's adapter (shards and predictions under ``round-N/holdout/``) -> ``judge.request`` batches
  with ``split: holdout`` (no ``infer.done``: the batches carry their count). Split ``baseline``
  (``promotion.only_if_better``): the same for the eval split, answered by the route's current adapter as the
  controller copied it under this migration's prefix (``round-N/baseline/``).

A cancelled migration's answering stops before its next shard (nothing more stored, nothing published).
"""

from __future__ import annotations

import asyncio
import random
import shutil

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.contracts.events import (
    InferDone,
    InferRequestEvent,
    JudgeRequest,
    MigrationCompletedEvent,
    Subject,
    TrainDoneEvent,
)
from llamaduo.data.examples import Example
from llamaduo.services.inference.serve_after import Servers, serve_completed
from llamaduo.services.inference.shards import predict_round
from llamaduo.storage.keys import answered_data_key, data_key
from llamaduo.storage.store import ArtifactStore, SpecCache

INFERENCE = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
SERVING = Delivery(max_deliver=2, ack_wait=60.0, backoff=(10.0,))


def register(bus: Bus, store: ArtifactStore) -> None:
    """Subscribe the inference service's consumers on ``bus``."""
    specs = SpecCache(store)
    servers: Servers = {}

    @bus.consumer(Subject.MIGRATION_COMPLETED, "inference-serve", SERVING)
    async def on_completed(event: MigrationCompletedEvent) -> None:
        """Serve the chosen model when the migration's spec asks (``serve.enabled``)."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        if not spec.serve.enabled:
            return
        await asyncio.to_thread(serve_completed, store, spec, event.migration_id, servers,
                                bus.settings.work_dir / "serving", model_key=event.payload.model.key or None,
                                model_sha256=event.payload.model.sha256)

    @bus.consumer(Subject.INFER_REQUEST, "inference-request", INFERENCE)
    async def on_infer_request(event: InferRequestEvent) -> None:
        """Answer the holdout split, or the eval split for a baseline, with the adapter named; hand over to judges."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        split = event.payload.split
        prompts = await asyncio.to_thread(store.read_models, answered_data_key(event.migration_id, split), Example)
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}-{split}"
        items, _ = await asyncio.to_thread(
            predict_round, store, spec, prompts, event.migration_id, event.round, event.payload.adapter, model_dir,
            should_stop=bus.stopping.is_set, split=split, should_cancel=bus.cancelled.checker(event.migration_id))
        size = spec.judge.batch_size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        for b, chunk in enumerate(batches):
            await bus.emit(event.follow(Subject.JUDGE_REQUEST, JudgeRequest(
                batch=b, batches=len(batches), items=chunk, split=split), key=f"judge-{split}-{b}"))
        shutil.rmtree(model_dir, ignore_errors=True)

    @bus.consumer(Subject.TRAIN_DONE, "inference", INFERENCE)
    async def on_train_done(event: TrainDoneEvent) -> None:
        """Generate K answers per test prompt with the new adapter and hand them to the judges."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        test = await asyncio.to_thread(
            store.read_models, data_key(event.migration_id, "test"), Example)
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}"
        items, predictions = await asyncio.to_thread(
            predict_round, store, spec, test, event.migration_id, event.round, event.payload.adapter, model_dir,
            should_stop=bus.stopping.is_set, should_cancel=bus.cancelled.checker(event.migration_id))
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
