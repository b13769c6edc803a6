"""One training round end to end: train with checkpoints kept in S3 and upload the adapter
(:func:`train_round`), then, when the spec asks, the adapter merged into its base (:func:`export_merged_round`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import ArtifactRef
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.runtime.work_clock import work_stage
from llamaduo.services.trainer.checkpoints import CheckpointUploader, checkpoint_every_s, restore_checkpoint
from llamaduo.storage.keys import checkpoint_prefix, round_key
from llamaduo.storage.store import ArtifactStore

if TYPE_CHECKING:
    from llamaduo.contracts.events import TrainProgress
    from llamaduo.services.trainer.domain import TrainResult


def train_round(
    store: ArtifactStore,
    spec: MigrationSpec,
    rows: list[Example],
    migration_id: str,
    round: int,
    work: Path,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    every_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[TrainResult, ArtifactRef]:
    """Train a round's student in ``work`` with checkpoints kept in S3, and upload the result.

    Restores the stored checkpoint when it is ahead of ``work/checkpoints``, trains (copying checkpoints to
    :func:`~llamaduo.storage.keys.checkpoint_prefix` as they are saved) and uploads the adapter folder to
    ``round_key(..., "adapter")`` (write once: a different adapter already there is kept, the new one goes to
    ``adapter-<sha12>``, see :meth:`~llamaduo.storage.store.ArtifactStore.put_dir`). Returns
    ``(TrainResult, adapter ref)``. The stored checkpoint is left for the caller to
    :func:`~llamaduo.services.trainer.checkpoints.forget_checkpoints` once the result is announced.
    ``should_cancel`` (the migration was cancelled): checked after every step and before the upload; when true,
    :class:`~llamaduo.bus.cancellation.MigrationCancelled` is raised and nothing more is written to the store.
    """
    from llamaduo.services.trainer.domain import train

    prefix = checkpoint_prefix(migration_id, round)
    checkpoints = work / "checkpoints"
    with work_stage("other"):
        restore_checkpoint(store, prefix, checkpoints)
    out_dir = work / "adapter"
    shutil.rmtree(out_dir, ignore_errors=True)
    uploader = CheckpointUploader(store, prefix, work / "checkpoint-staging")
    try:
        result = train(
            spec.student, rows, spec.task.system_prompt, out_dir,
            progress=progress, checkpoint_dir=checkpoints,
            checkpoint_every_s=checkpoint_every_s() if every_s is None else every_s,
            on_checkpoint=uploader, should_stop=should_stop, should_cancel=should_cancel,
        )
        if should_cancel is not None and should_cancel():
            raise MigrationCancelled(f"round {round} trained, not uploaded: the migration was cancelled")
    except MigrationCancelled:
        uploader.close(flush=False)  # a cancelled migration is never resumed
        raise
    except BaseException:
        uploader.close(flush=True)  # a failed run's redelivery resumes from the newest checkpoint
        raise
    uploader.close(flush=False)
    # write once: a redelivered round never replaces an adapter a published train.done names
    with work_stage("other"):
        adapter = store.put_dir(round_key(migration_id, round, "adapter"), out_dir, once=True)
    return result, adapter


def export_merged_round(
    store: ArtifactStore, spec: MigrationSpec, migration_id: str, round: int, work: Path
) -> ArtifactRef | None:
    """With ``student.export_merged`` (LoRA), merge the adapter trained in ``work/adapter`` into its base and
    upload the standalone model folder to ``round_key(mid, round, "merged")``. None when the spec does not ask."""
    if not spec.student.export_merged or spec.student.method != "lora":
        return None
    from llamaduo.services.trainer.domain import export_merged

    out_dir = work / "merged"
    shutil.rmtree(out_dir, ignore_errors=True)
    export_merged(work / "adapter", out_dir)
    return store.put_dir(round_key(migration_id, round, "merged"), out_dir, once=True)
