"""Trainer bus adapter: ``train.request`` -> fine-tune -> adapter to S3 -> ``train.done``."""

from __future__ import annotations

import asyncio
import shutil
import time

from llamaduo.bus import Bus, Delivery
from llamaduo.contracts import Subject, TrainDone, TrainProgress, TrainRequestEvent
from llamaduo.examples import Example
from llamaduo.store import ArtifactStore, SpecCache, round_key

TRAINING = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
PROGRESS_EVERY_S = 2.0


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    @bus.consumer(Subject.TRAIN_REQUEST, "trainer", TRAINING)
    async def on_train_request(event: TrainRequestEvent) -> None:
        """Train the student on the listed datasets and publish the adapter."""
        from llamaduo.services.trainer.domain import train

        spec = await asyncio.to_thread(specs.get, event.migration_id)
        rows: list[Example] = []
        for ref in event.payload.datasets:
            rows.extend(await asyncio.to_thread(
                lambda key=ref.key: [Example.model_validate(r) for r in store.iter_jsonl(key)]))
        work = bus.settings.work_dir / "trainer" / event.migration_id / f"round-{event.round}"
        out_dir = work / "adapter"
        shutil.rmtree(out_dir, ignore_errors=True)
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(info: object) -> None:
            now = time.monotonic()
            step, total = getattr(info, "step", 0), getattr(info, "total_steps", 0)
            if now - last[0] < PROGRESS_EVERY_S and step != total:
                return
            last[0] = now
            payload = TrainProgress(step=step, total_steps=total, loss=getattr(info, "loss", None),
                                    tokens_per_second=getattr(info, "tokens_per_second", None),
                                    eta_seconds=getattr(info, "eta_seconds", None))
            asyncio.run_coroutine_threadsafe(bus.emit(event.follow(Subject.TRAIN_PROGRESS, payload)), loop)

        result = await asyncio.to_thread(
            train, spec.student, rows, spec.task.system_prompt, out_dir,
            progress=progress, checkpoint_dir=work / "checkpoints",
        )
        adapter = await asyncio.to_thread(store.put_dir, round_key(event.migration_id, event.round, "adapter"),
                                          out_dir)
        await bus.emit(event.follow(Subject.TRAIN_DONE, TrainDone(
            adapter=adapter, rows=len(rows), train_loss=result.train_loss, seconds=result.seconds,
        ), key="done"))
        shutil.rmtree(work, ignore_errors=True)
