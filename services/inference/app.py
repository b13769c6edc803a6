"""Inference bus adapter.

* ``train.done`` -> split the round's test split into shards of ``PROMPTS_PER_SHARD`` prompts (seeded order,
  :func:`~llamaduo.services.inference.shards.plan_shards`) -> ``infer.done`` (the round's size and judge batch
  count) -> one ``infer.shard`` request per shard, on a work queue shared by every replica.
* ``infer.shard`` -> answer the shard (the student loaded once per worker and round, with the backend
  ``student.inference.backend`` picks, see the domain module; a stored shard reused) -> the shard to S3 -> its
  ``judge.request`` batches at once, so judging overlaps the generation of the other shards; whoever stores the
  last shard joins them into the round's ``predictions.jsonl``. A shard of a round whose judging the controller
  closed (early stopping, :class:`~llamaduo.storage.markers.ClosedRounds`) before or while it is answered is
  abandoned: nothing would judge it, so that round's ``predictions.jsonl`` is not written (its answered shards
  stay in S3).
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
import logging
import os
import shutil
import socket
import threading
import time

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.bus.topology import INFERENCE_SHARD
from llamaduo.contracts.events import (
    ArtifactRef,
    InferDone,
    InferRequestEvent,
    InferShard,
    InferShardEvent,
    JudgeRequest,
    MigrationCompletedEvent,
    Subject,
    TrainDoneEvent,
)
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.runtime.work_clock import WorkClock, work_stage
from llamaduo.services.inference.domain import every
from llamaduo.services.inference.serve_after import Servers, serve_completed
from llamaduo.services.inference.shards import (
    Answerer,
    ShardAbandoned,
    answer_shard,
    join_if_complete,
    lazy_answerer,
    plan_shards,
    predict_round,
)
from llamaduo.storage.keys import answered_data_key, data_key, predictions_key
from llamaduo.storage.markers import ClosedRounds
from llamaduo.storage.store import ArtifactStore, SpecCache

log = logging.getLogger("llamaduo.inference")

#: Who answered a shard (host and process), in the ``shard answered`` log line.
PRODUCER = f"{socket.gethostname()}:{os.getpid()}"

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
        clock = WorkClock()
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        split = event.payload.split
        prompts = await asyncio.to_thread(store.read_models, answered_data_key(event.migration_id, split), Example)
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}-{split}"
        # the student this worker already holds for the round's eval answers, when it is that adapter (a holdout
        # right after its round); else predict_round loads it, leaving the held one alone
        answer = held_answerer(event.migration_id, event.round, event.payload.adapter)
        with clock.stage("generate"):
            items, _ = await asyncio.to_thread(
                predict_round, store, spec, prompts, event.migration_id, event.round, event.payload.adapter,
                model_dir, should_stop=bus.stopping.is_set, split=split,
                should_cancel=bus.cancelled.checker(event.migration_id), answer=answer)
        size = spec.judge.batch_size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        for b, chunk in enumerate(batches):
            await bus.emit(event.follow(Subject.JUDGE_REQUEST, JudgeRequest(
                batch=b, batches=len(batches), items=chunk, split=split, work=clock.work() if b == 0 else None),
                key=f"judge-{split}-{b}"))
        shutil.rmtree(model_dir, ignore_errors=True)

    @bus.consumer(Subject.TRAIN_DONE, "inference", INFERENCE)
    async def on_train_done(event: TrainDoneEvent) -> None:
        """Split the round's eval split into ``infer.shard`` requests (any replica answers each one); first
        ``infer.done`` with the round's size, so the controller knows its total before any score arrives."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        test = await asyncio.to_thread(store.read_models, data_key(event.migration_id, "test"), Example)
        k = spec.student.inference.samples_per_prompt
        plans, batches = plan_shards([e.id for e in test], spec.dataset.seed, event.round, k, spec.judge.batch_size)
        predictions = ArtifactRef(key=predictions_key(event.migration_id, event.round), rows=len(test) * k)
        await bus.emit(event.follow(Subject.INFER_DONE, InferDone(
            predictions=predictions, prompts=len(test), samples_per_prompt=k, batches=batches, shards=len(plans)),
            key="infer"))
        for plan in plans:
            await bus.emit(event.follow(Subject.INFER_SHARD, InferShard(
                adapter=event.payload.adapter, shard=plan.shard, shards=len(plans), prompt_ids=plan.prompt_ids,
                first_batch=plan.first_batch, shard_batches=plan.batches, batches=batches), key=f"shard-{plan.shard}"))
        log.info("round split into shards", extra={"migration_id": event.migration_id, "round": event.round,
                                                   "shards": len(plans), "batches": batches})

    tests: dict[str, dict[str, Example]] = {}
    rounds = ClosedRounds(store)
    answerers: dict[tuple[str, int, str], Answerer] = {}
    loading = threading.Lock()

    def round_answerer(spec: MigrationSpec, mid: str, round: int, adapter: ArtifactRef) -> Answerer:
        """The round's student, loaded once per worker (the last round's kept; an older one dropped)."""
        key = (mid, round, adapter.sha256 or adapter.key)
        with loading:
            if key not in answerers:
                for old in list(answerers):
                    del answerers[old]
                    shutil.rmtree(bus.settings.work_dir / "inference" / old[0] / f"round-{old[1]}",
                                  ignore_errors=True)
                model_dir = bus.settings.work_dir / "inference" / mid / f"round-{round}"

                def load() -> Answerer:
                    from llamaduo.services.inference.domain import load_generator

                    with work_stage("load"):
                        store.get_ref_dir(mid, adapter, model_dir)
                        generator = load_generator(spec.student, model_dir)
                    return lambda prompts, should_stop=None: generator.generate(
                        prompts, spec.task.system_prompt, should_stop=should_stop)

                answerers[key] = lazy_answerer(load)
            return answerers[key]

    def held_answerer(mid: str, round: int, adapter: ArtifactRef) -> Answerer | None:
        with loading:
            return answerers.get((mid, round, adapter.sha256 or adapter.key))

    def test_examples(mid: str) -> dict[str, Example]:
        if mid not in tests:
            if len(tests) > 8:
                tests.clear()
            tests[mid] = {e.id: e for e in store.read_models(data_key(mid, "test"), Example)}
        return tests[mid]

    @bus.consumer(Subject.INFER_SHARD, INFERENCE_SHARD, INFERENCE)
    async def on_infer_shard(event: InferShardEvent) -> None:
        """Answer one shard of a round (the stored one reused), publish its judge batches at once (judging
        overlaps the rest of the round's generation); whoever stores the last shard joins the predictions."""
        clock = WorkClock()
        p = event.payload
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        by_id = await asyncio.to_thread(test_examples, event.migration_id)
        chunk = [by_id[i] for i in p.prompt_ids]
        k = spec.student.inference.samples_per_prompt
        started = time.monotonic()
        # judging may close before or while this shard is answered (the scores of earlier shards decide): asked
        # before the model is loaded, then once a second during generation
        closed = every(1.0, lambda: rounds.closed(event.migration_id, event.round))
        try:
            with clock.stage("generate"):  # the model load inside (first shard of the round here) is "load"
                items, generated = await asyncio.to_thread(
                    answer_shard, store, chunk, event.migration_id, event.round, p.shard,
                    round_answerer(spec, event.migration_id, event.round, p.adapter), k,
                    should_stop=bus.stopping.is_set, should_cancel=bus.cancelled.checker(event.migration_id),
                    abandon=closed)
        except ShardAbandoned as abandoned:
            log.info("shard abandoned", extra={"migration_id": event.migration_id, "round": event.round,
                                               "shard": p.shard, "detail": str(abandoned)})
            return
        log.info("shard answered", extra={"migration_id": event.migration_id, "round": event.round,
                                          "shard": p.shard, "shards": p.shards, "generated": generated,
                                          "producer": PRODUCER, "seconds": round(time.monotonic() - started, 3)})
        # joined before this shard's batches go out: the round cannot be judged in full before its predictions exist
        await asyncio.to_thread(join_if_complete, store, event.migration_id, event.round, p.shards, k)
        size = spec.judge.batch_size
        work = clock.work()
        for b in range(p.shard_batches):
            chunk_items = items[b * size:(b + 1) * size]
            index = p.first_batch + b
            await bus.emit(event.follow(Subject.JUDGE_REQUEST, JudgeRequest(
                batch=index, batches=p.batches, items=chunk_items, work=work if b == 0 else None),
                key=f"judge-{index}"))
