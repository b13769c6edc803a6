"""Training checkpoints that survive the machine.

Every checkpoint the trainer saves is copied to :func:`~llamaduo.storage.keys.checkpoint_prefix` in a background thread
(:class:`CheckpointUploader`), and a (re)delivered request first restores the newest checkpoint from there when
it is ahead of the local one (:func:`restore_checkpoint`), so a trainer killed mid-run resumes where it was, on
this machine or another. The S3 copy is removed (:func:`forget_checkpoints`) once ``train.done`` is out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llamaduo.contracts.events import ArtifactRef
from llamaduo.storage.store import ArtifactStore, StoreError

# the service's logger: these lines are the trainer service's
log = logging.getLogger("llamaduo.trainer")

#: Environment variable overriding how often (seconds) a checkpoint is saved and copied to S3.
CHECKPOINT_EVERY_ENV = "LLAMADUO_CHECKPOINT_EVERY_S"
_INDEX = "_index.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
