"""Trainer bus adapter: ``train.request`` -> fine-tune -> adapter to S3 -> ``train.done``.

With ``student.export_merged`` the adapter merged into its base model is uploaded too, to
``round_key(mid, round, "merged")``, and ``train.done`` carries its ref (``merged``).

Checkpoints survive the machine: every checkpoint the trainer saves is copied to
``round_key(mid, round, "checkpoints", "latest")`` in a background thread, and a (re)delivered request first
restores the newest checkpoint from there when it is ahead of the local one, so a trainer killed mid-run
resumes where it was, on this machine or another. The S3 copy is removed once ``train.done`` is out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from llamaduo.bus.broker import Bus, Delivery, WorkReturned
from llamaduo.contracts.events import ArtifactRef, Subject, TrainDone, TrainProgress, TrainRequestEvent
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.services.trainer.domain import TrainingStopped
from llamaduo.storage.keys import round_key
from llamaduo.storage.store import ArtifactStore, SpecCache, StoreError

if TYPE_CHECKING:
    from llamaduo.services.trainer.domain import TrainProgressInfo, TrainResult

log = logging.getLogger("llamaduo.trainer")

TRAINING = Delivery(max_deliver=3, ack_wait=60.0, backoff=(5.0, 30.0))
PROGRESS_EVERY_S = 2.0
#: Environment variable overriding how often (seconds) a checkpoint is saved and copied to S3.
CHECKPOINT_EVERY_ENV = "LLAMADUO_CHECKPOINT_EVERY_S"
_INDEX = "_index.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_prefix(migration_id: str, round: int) -> str:
    """S3 folder holding the newest training checkpoint of a round."""
    return round_key(migration_id, round, "checkpoints", "latest")


def checkpoint_every_s() -> float:
    """Checkpoint interval: ``$LLAMADUO_CHECKPOINT_EVERY_S`` or the trainer's default."""
    from llamaduo.services.trainer.domain import CHECKPOINT_EVERY_S

    value = os.environ.get(CHECKPOINT_EVERY_ENV, "").strip()
    return float(value) if value else CHECKPOINT_EVERY_S


def _step(name: str) -> int | None:
    found = _CHECKPOINT_RE.match(name)
    return int(found.group(1)) if found else None


def local_checkpoint_step(checkpoint_dir: Path) -> int | None:
    """Step of the newest ``checkpoint-<step>`` folder in ``checkpoint_dir`` (None: none there)."""
    if not checkpoint_dir.is_dir():
        return None
    steps = [s for p in checkpoint_dir.iterdir() if p.is_dir() and (s := _step(p.name)) is not None]
    return max(steps, default=None)


def remote_checkpoint_step(store: ArtifactStore, prefix: str) -> int | None:
    """Step of the checkpoint stored under ``prefix`` (None: no complete one there)."""
    if not store.exists(f"{prefix}/{_INDEX}"):
        return None
    index: dict[str, str] = store.get_json(f"{prefix}/{_INDEX}")
    steps = {s for rel in index if (s := _step(rel.split("/", 1)[0])) is not None}
    return max(steps) if len(steps) == 1 else None


def upload_checkpoint(store: ArtifactStore, prefix: str, staged: Path) -> ArtifactRef:
    """Upload ``staged`` (a folder holding one ``checkpoint-<step>`` folder) to ``prefix``, then drop the
    previous checkpoint's objects. Object names carry the step, so until the new index is written the old
    index still names a complete, untouched checkpoint."""
    before = set(store.list(f"{prefix}/"))
    ref = store.put_dir(prefix, staged)
    keep = {f"{prefix}/{p.relative_to(staged).as_posix()}" for p in staged.rglob("*") if p.is_file()}
    store.delete(sorted(before - keep - {f"{prefix}/{_INDEX}"}))
    return ref


def forget_checkpoints(store: ArtifactStore, prefix: str) -> None:
    """Remove the stored checkpoint under ``prefix`` (index first, so no reader takes a partial folder)."""
    keys = store.list(f"{prefix}/")
    index = f"{prefix}/{_INDEX}"
    store.delete([k for k in keys if k == index] + [k for k in keys if k != index])


def restore_checkpoint(store: ArtifactStore, prefix: str, checkpoint_dir: Path) -> int | None:
    """Bring the stored checkpoint into ``checkpoint_dir`` when it is ahead of the local one.

    Returns the restored step, or None when nothing was restored (none stored, or the local one is as new).
    The download goes to a sibling folder renamed into place, so an interrupted restore leaves nothing
    half-written; a stored checkpoint that fails its hashes is ignored (training starts without it).
    """
    remote = remote_checkpoint_step(store, prefix)
    local = local_checkpoint_step(checkpoint_dir)
    if remote is None or (local is not None and local >= remote):
        return None
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".restoring")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        store.get_dir(prefix, tmp)
    except StoreError as err:
        log.warning("stored checkpoint %s is unusable, training without it: %s", prefix, err)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, checkpoint_dir)
    log.info("restored checkpoint-%d from %s (local: %s)", remote, prefix, local)
    return remote


def _link_tree(src: Path, dest: Path) -> None:
    try:
        shutil.copytree(src, dest, copy_function=os.link)
    except OSError:  # no hard links here (another file system): copy
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)


class CheckpointUploader:
    """The ``on_checkpoint`` hook of :func:`~llamaduo.services.trainer.domain.train`: copies checkpoints to S3.

    On the training thread a checkpoint is only hard-linked into ``staging`` (the trainer deletes the older
    folder when it saves the next, the links keep the files); one background thread uploads the newest staged
    checkpoint, and a staged one that a newer one overtook before its upload began is dropped. Upload errors
    are logged, not raised: a checkpoint copy is best effort, the training goes on.
    """

    def __init__(self, store: ArtifactStore, prefix: str, staging: Path) -> None:
        self.store, self.prefix, self.staging = store, prefix, staging
        self.uploaded: list[str] = []
        self._lock = threading.Lock()
        self._pending: Path | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        shutil.rmtree(staging, ignore_errors=True)

    def __call__(self, folder: Path) -> None:
        staged = self.staging / folder.name
        shutil.rmtree(staged, ignore_errors=True)
        _link_tree(folder, staged / folder.name)
        with self._lock:
            overtaken, self._pending = self._pending, staged
        if overtaken is not None:
            shutil.rmtree(overtaken, ignore_errors=True)
        self._pool.submit(self._upload_pending)

    def _upload_pending(self) -> None:
        with self._lock:
            staged, self._pending = self._pending, None
        if staged is None:
            return
        try:
            upload_checkpoint(self.store, self.prefix, staged)
            self.uploaded.append(staged.name)
        except Exception:
            log.warning("could not copy %s to %s", staged.name, self.prefix, exc_info=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def close(self, *, flush: bool) -> None:
        """Wait for the upload under way; ``flush``: upload the newest staged checkpoint too, else drop it."""
        if not flush:
            with self._lock:
                dropped, self._pending = self._pending, None
            if dropped is not None:
                shutil.rmtree(dropped, ignore_errors=True)
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.staging, ignore_errors=True)


def train_round(
    store: ArtifactStore,
    spec: MigrationSpec,
    rows: list[Example],
    migration_id: str,
    round: int,
    work: Path,
    *,
    progress: Callable[[TrainProgressInfo], None] | None = None,
    every_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[TrainResult, ArtifactRef]:
    """Train a round's student in ``work`` with checkpoints kept in S3, and upload the result.

    Restores the stored checkpoint when it is ahead of ``work/checkpoints``, trains (copying checkpoints to
    :func:`checkpoint_prefix` as they are saved) and uploads the adapter folder to ``round_key(..., "adapter")``.
    Returns ``(TrainResult, adapter ref)``. The stored checkpoint is left for the caller to
    :func:`forget_checkpoints` once the result is announced.
    """
    from llamaduo.services.trainer.domain import train

    prefix = checkpoint_prefix(migration_id, round)
    checkpoints = work / "checkpoints"
    restore_checkpoint(store, prefix, checkpoints)
    out_dir = work / "adapter"
    shutil.rmtree(out_dir, ignore_errors=True)
    uploader = CheckpointUploader(store, prefix, work / "checkpoint-staging")
    try:
        result = train(
            spec.student, rows, spec.task.system_prompt, out_dir,
            progress=progress, checkpoint_dir=checkpoints,
            checkpoint_every_s=checkpoint_every_s() if every_s is None else every_s,
            on_checkpoint=uploader, should_stop=should_stop,
        )
    except BaseException:
        uploader.close(flush=True)  # a failed run's redelivery resumes from the newest checkpoint
        raise
    uploader.close(flush=False)
    adapter = store.put_dir(round_key(migration_id, round, "adapter"), out_dir)
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
    return store.put_dir(round_key(migration_id, round, "merged"), out_dir)


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    @bus.consumer(Subject.TRAIN_REQUEST, "trainer", TRAINING)
    async def on_train_request(event: TrainRequestEvent) -> None:
        """Train the student on the listed datasets and publish the adapter."""
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        rows: list[Example] = []
        for ref in event.payload.datasets:
            rows.extend(await asyncio.to_thread(store.read_models, ref.key, Example))
        work = bus.settings.work_dir / "trainer" / event.migration_id / f"round-{event.round}"
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

        try:
            result, adapter = await asyncio.to_thread(
                train_round, store, spec, rows, event.migration_id, event.round, work, progress=progress,
                should_stop=bus.stopping.is_set)
        except TrainingStopped as stopped:  # shutting down: the checkpoint is in S3, the request goes back
            raise WorkReturned(str(stopped)) from None
        merged = await asyncio.to_thread(export_merged_round, store, spec, event.migration_id, event.round, work)
        await bus.emit(event.follow(Subject.TRAIN_DONE, TrainDone(
            adapter=adapter, rows=len(rows), train_loss=result.train_loss, seconds=result.seconds, merged=merged,
        ), key="done"))
        await asyncio.to_thread(forget_checkpoints, store, checkpoint_prefix(event.migration_id, event.round))
        shutil.rmtree(work, ignore_errors=True)
