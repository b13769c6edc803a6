"""Trainer bus adapter: ``train.request`` -> fine-tune -> adapter to S3 -> ``train.done``.

With ``student.export_merged`` the adapter merged into its base model is uploaded too, to
``round_key(mid, round, "merged")``, and ``train.done`` carries its ref (``merged``). Checkpoints are kept in S3
while a round trains (see :mod:`~llamaduo.services.trainer.checkpoints`), so a trainer killed mid-run resumes
where it was, on this machine or another; the S3 copy is removed once ``train.done`` is out. A round end to end
is :mod:`~llamaduo.services.trainer.rounds`. A cancelled migration's training stops after its current step:
no ``train.done``, nothing uploaded, its stored checkpoints removed.
"""

from __future__ import annotations

import asyncio
import shutil
import time

from llamaduo.bus.broker import Bus, Delivery, PermanentError, WorkReturned
from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import Subject, TrainDone, TrainProgress, TrainRequestEvent
from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.models.resolve import ModelResolutionError
from llamaduo.runtime.work_clock import WorkClock
from llamaduo.services.trainer.checkpoints import forget_checkpoints
from llamaduo.services.trainer.domain import TrainingStopped
from llamaduo.services.trainer.rounds import export_merged_round, train_round
from llamaduo.storage.keys import checkpoint_prefix
from llamaduo.storage.store import ArtifactStore, SpecCache

TRAINING = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
PROGRESS_EVERY_S = 2.0


def register(bus: Bus, store: ArtifactStore) -> None:
    """Subscribe the trainer service's consumer on ``bus``."""
    specs = SpecCache(store)

    @bus.consumer(Subject.TRAIN_REQUEST, "trainer", TRAINING)
    async def on_train_request(event: TrainRequestEvent) -> None:
        """Train the student on the listed datasets and publish the adapter."""
        clock = WorkClock()
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        rows: list[Example] = []
        for ref in event.payload.datasets:
            # the migration's own object, as it was published (key prefix and sha256 checked)
            rows.extend(await asyncio.to_thread(store.read_ref_models, event.migration_id, ref, Example))
        work = bus.settings.work_dir / "trainer" / event.migration_id / f"round-{event.round}"
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(info: TrainProgress) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_EVERY_S and info.step != info.total_steps:
                return
            last[0] = now
            asyncio.run_coroutine_threadsafe(bus.emit(event.follow(Subject.TRAIN_PROGRESS, info)), loop)

        try:
            with clock.stage("train"):  # the model load inside is timed as "load", the upload as "other"
                result, adapter = await asyncio.to_thread(
                        train_round, store, spec, rows, event.migration_id, event.round, work, progress=progress,
                    should_stop=bus.stopping.is_set, should_cancel=bus.cancelled.checker(event.migration_id))
        except MigrationCancelled:  # nothing of a cancelled migration is kept: it is never resumed
            await asyncio.to_thread(forget_checkpoints, store, checkpoint_prefix(event.migration_id, event.round))
            shutil.rmtree(work, ignore_errors=True)
            raise
        except TrainingStopped as stopped:  # shutting down: the checkpoint is in S3, the request goes back
            raise WorkReturned(str(stopped)) from None
        except (SpecError, ModelResolutionError) as err:  # rows that cannot fit max_length, an unknown base model
            if getattr(err, "retryable", False):  # the Hugging Face Hub could not be reached: try again later
                raise
            raise PermanentError(str(err)) from err
        merged = await asyncio.to_thread(export_merged_round, store, spec, event.migration_id, event.round, work)
        await bus.emit(event.follow(Subject.TRAIN_DONE, TrainDone(
            adapter=adapter, rows=result.rows, rows_too_long=result.rows_too_long, train_loss=result.train_loss,
            seconds=result.seconds, merged=merged, work=clock.work(),
        ), key="done"))
        await asyncio.to_thread(forget_checkpoints, store, checkpoint_prefix(event.migration_id, event.round))
        shutil.rmtree(work, ignore_errors=True)
