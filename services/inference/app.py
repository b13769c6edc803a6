"""Inference bus adapter: ``train.done`` -> answer the test split -> predictions to S3 ->
``judge.request`` batches and ``infer.done``."""

from __future__ import annotations

import asyncio
import shutil

from llamaduo.bus import Bus, Delivery
from llamaduo.contracts import InferDone, JudgeItem, JudgeRequest, Subject, TrainDoneEvent
from llamaduo.examples import Example
from llamaduo.store import ArtifactStore, SpecCache, data_key, round_key

INFERENCE = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    @bus.consumer(Subject.TRAIN_DONE, "inference", INFERENCE)
    async def on_train_done(event: TrainDoneEvent) -> None:
        """Generate K answers per test prompt with the new adapter and hand them to the judges."""
        from llamaduo.services.inference.domain import StudentGenerator

        spec = await asyncio.to_thread(specs.get, event.migration_id)
        test = await asyncio.to_thread(
            lambda: [Example.model_validate(r) for r in store.iter_jsonl(data_key(event.migration_id, "test"))])
        model_dir = bus.settings.work_dir / "inference" / event.migration_id / f"round-{event.round}"
        await asyncio.to_thread(store.get_dir, event.payload.adapter.key, model_dir)
        generator = await asyncio.to_thread(StudentGenerator.load, spec.student, model_dir)
        answers = await asyncio.to_thread(generator.generate, [e.instruction for e in test],
                                          spec.task.system_prompt)
        items = [JudgeItem(item_id=e.id, sample=k, instruction=e.instruction, reference=e.response,
                           candidate=answer)
                 for e, samples in zip(test, answers, strict=True) for k, answer in enumerate(samples)]
        predictions = await asyncio.to_thread(
            store.put_jsonl, round_key(event.migration_id, event.round, "predictions.jsonl"), items)
        size = spec.judge.batch_size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        for b, chunk in enumerate(batches):
            await bus.emit(event.follow(Subject.JUDGE_REQUEST,
                                        JudgeRequest(batch=b, batches=len(batches), items=chunk), key=f"judge-{b}"))
        await bus.emit(event.follow(Subject.INFER_DONE, InferDone(
            predictions=predictions, prompts=len(test), samples_per_prompt=spec.student.inference.samples_per_prompt,
            batches=len(batches)), key="infer"))
        shutil.rmtree(model_dir, ignore_errors=True)
