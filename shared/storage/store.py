"""The one artifact store client: datasets, adapters, predictions and reports in any S3 server.

Keys live under ``migrations/{migration_id}/...`` and are built only from validated ids, so a migration
cannot address another one's objects. Large objects stream through temporary files; nothing is read whole
unless the caller asks for bytes.

Integrity rules for what events name (an :class:`~llamaduo.contracts.events.ArtifactRef`):

* Read through :meth:`ArtifactStore.read_ref`, :meth:`~ArtifactStore.read_ref_models` or
  :meth:`~ArtifactStore.get_ref_dir`: the key must lie under the migration's prefix
  (:func:`~llamaduo.storage.keys.require_own_key`) and what is read must match the ref's ``sha256`` (for a
  folder: its ``_index.json``, whose per-file hashes are then checked), else :class:`StoreError`.
* A folder index naming an absolute or ``..`` path is refused (nothing is written outside the folder).
* Write once: with ``once=True`` (:meth:`~ArtifactStore.put_file`, :meth:`~ArtifactStore.put_jsonl`,
  :meth:`~ArtifactStore.put_dir`) an object that exists with the same content is not written again, and one
  that exists with *different* content is never replaced: the new content goes to a key that includes its hash
  (``name-<sha12>.ext``, folder ``name-<sha12>``), and the returned ref names that key. So whatever a published
  event names stays what it named, whatever a redelivery produces.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from llamaduo.contracts.events import ArtifactRef
from llamaduo.errors import StoreError
from llamaduo.settings import Settings
from llamaduo.storage.keys import (
    check_key,
    require_own_key,
    spec_key,
    traffic_day_prefix,
    traffic_days,
    traffic_key_time,
)

#: How long before a window's start a traffic batch may have started and still hold rows of the window.
TRAFFIC_BATCH_SLACK = timedelta(hours=1)

_CHUNK = 1 << 20
M = TypeVar("M", bound=BaseModel)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """A bucket on an S3 server, reached with the ``minio`` client."""

    def __init__(self, settings: Settings) -> None:
        from minio import Minio

        self.bucket = settings.s3_bucket
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    def ensure_bucket(self) -> None:
        from minio.error import InvalidResponseError, S3Error

        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except (S3Error, InvalidResponseError):
            # another service made it in the meantime (some servers answer that in a non-XML body)
            if not self._client.bucket_exists(self.bucket):
                raise

    # ---------------------------------------------------------------- single objects

    def put_file(self, key: str, path: Path, *, rows: int | None = None, once: bool = False) -> ArtifactRef:
        """Upload ``path`` to ``key``. With ``once``, an object already at ``key`` is never replaced: same content
        is not uploaded again, different content goes to ``name-<sha12>.ext`` (the returned ref's key)."""
        digest = sha256_file(path)
        if once:
            key, stored = self._write_once_key(key, digest)
            if stored:
                return ArtifactRef(key=key, sha256=digest, rows=rows)
        self._client.fput_object(self.bucket, key, str(path), metadata={"sha256": digest})
        return ArtifactRef(key=key, sha256=digest, rows=rows)

    def stored_sha256(self, key: str) -> str | None:
        """The sha256 of the object at ``key`` (its recorded metadata, else computed), or None when absent."""
        from minio.error import S3Error

        try:
            stat = self._client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise
        meta = {str(k).lower(): str(v) for k, v in (stat.metadata or {}).items()}
        recorded = meta.get("x-amz-meta-sha256")
        if recorded:
            return recorded
        with tempfile.TemporaryDirectory() as tmp:
            return sha256_file(self.get_file(key, Path(tmp) / "object"))

    def _write_once_key(self, key: str, digest: str) -> tuple[str, bool]:
        """Where content ``digest`` goes under the write-once rule: ``(key, already stored there)``."""
        stored = self.stored_sha256(key)
        if stored is None or stored == digest:
            return key, stored is not None
        renamed = _hashed_key(key, digest)
        stored = self.stored_sha256(renamed)
        if stored is not None and stored != digest:
            raise StoreError(f"artifact {renamed} exists with sha256 {stored}, not {digest}: refusing to replace it")
        return renamed, stored is not None

    def put_bytes(self, key: str, data: bytes, *, rows: int | None = None) -> ArtifactRef:
        digest = hashlib.sha256(data).hexdigest()
        self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), metadata={"sha256": digest})
        return ArtifactRef(key=key, sha256=digest, rows=rows)

    def put_json(self, key: str, value: Any) -> ArtifactRef:
        return self.put_bytes(key, _json_bytes(value))

    def get_bytes(self, key: str) -> bytes:
        resp = self._client.get_object(self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_file(self, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._client.fget_object(self.bucket, key, str(path))
        return path

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self._client.stat_object(self.bucket, key)
            return True
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def delete(self, keys: list[str]) -> None:
        """Remove objects (absent ones are fine)."""
        for key in keys:
            self._client.remove_object(self.bucket, key)

    def list(self, prefix: str) -> list[str]:
        return [o.object_name for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def list_traffic(self, route: str, since: datetime, until: datetime | None = None) -> list[str]:
        """Keys of a route's captured traffic batches that may hold rows of [``since``, ``until``] (UTC;
        ``until`` default now), oldest first: batches started in the window, or up to ``TRAFFIC_BATCH_SLACK``
        before it (a batch is named by its start; a reader filters rows by their own time). Only the day folders
        the window spans are listed."""
        until = until or datetime.now(UTC)
        start = since - TRAFFIC_BATCH_SLACK
        keys = [key for day in traffic_days(start, until) for key in self.list(traffic_day_prefix(route, day))]
        timed = [(t, key) for key in keys if (t := traffic_key_time(key)) is not None and start <= t <= until]
        return [key for _, key in sorted(timed)]

    # ---------------------------------------------------------------- JSON lines, streamed

    def put_jsonl(self, key: str, rows: Iterable[BaseModel | dict[str, Any]], *, once: bool = False) -> ArtifactRef:
        """Write rows one by one to a temp file, then upload it: memory stays flat for any size.

        ``once``: never replace different content already at ``key`` (see :meth:`put_file`)."""
        count = 0
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as tmp:
            for row in rows:
                line = row.model_dump_json() if isinstance(row, BaseModel) else json.dumps(row)
                tmp.write(line.encode() + b"\n")
                count += 1
        try:
            return self.put_file(key, Path(tmp.name), rows=count, once=once)
        finally:
            os.unlink(tmp.name)

    def iter_jsonl(self, key: str) -> Iterator[dict[str, Any]]:
        """Yield rows of a JSONL object as they arrive from the server."""
        resp = self._client.get_object(self.bucket, key)
        try:
            buf = b""
            for chunk in resp.stream(_CHUNK):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            resp.close()
            resp.release_conn()

    def read_models(self, key: str, model: type[M]) -> list[M]:
        """Every row of a JSONL object, validated as ``model`` (e.g. the examples of a dataset split)."""
        return [model.model_validate(row) for row in self.iter_jsonl(key)]

    # ---------------------------------------------------------------- folders (adapters, models)

    def put_dir(self, prefix: str, folder: Path, *, once: bool = False) -> ArtifactRef:
        """Upload every file under ``folder``; the index (names + hashes) is written last, so a reader
        that finds ``_index.json`` finds a complete folder. The ref's ``sha256`` is the index's.

        With ``once``, a folder whose index is already stored is never replaced: the same index uploads
        nothing, a different one goes to ``{prefix}-<sha12>`` (the returned ref's key)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        index = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
        data = _json_bytes(index)
        digest = hashlib.sha256(data).hexdigest()
        if once:
            prefix, stored = self._write_once_folder(prefix, digest)
            if stored:
                return ArtifactRef(key=prefix, sha256=digest)
        for rel, file_digest in index.items():
            self._client.fput_object(self.bucket, f"{prefix}/{rel}", str(folder / rel),
                                     metadata={"sha256": file_digest})
        ref = self.put_bytes(f"{prefix}/_index.json", data)
        return ArtifactRef(key=prefix, sha256=ref.sha256)

    def _write_once_folder(self, prefix: str, digest: str) -> tuple[str, bool]:
        """Where a folder whose index has ``digest`` goes under the write-once rule: ``(prefix, already there)``."""
        stored = self.stored_sha256(f"{prefix}/_index.json")
        if stored is not None and stored != digest:
            prefix = _hashed_key(prefix, digest)
            stored = self.stored_sha256(f"{prefix}/_index.json")
            if stored is not None and stored != digest:
                raise StoreError(f"folder {prefix} exists with another index: refusing to replace it")
        return prefix, stored == digest

    def copy_dir(self, source: str, prefix: str) -> ArtifactRef:
        """Copy a :meth:`put_dir` folder server-side from ``source`` (a key the operator named) to ``prefix``, index
        last, write-once like ``put_dir(once=True)``; the ref's ``sha256`` is the index's, checked by readers."""
        from minio.commonconfig import CopySource

        index_key = f"{check_key(source)}/_index.json"
        data = self.get_bytes(index_key)
        digest = hashlib.sha256(data).hexdigest()
        prefix, stored = self._write_once_folder(prefix, digest)
        if not stored:
            for rel in _parse_index(index_key, data):
                self._client.copy_object(self.bucket, f"{prefix}/{rel}", CopySource(self.bucket, f"{source}/{rel}"))
            self.put_bytes(f"{prefix}/_index.json", data)
        return ArtifactRef(key=prefix, sha256=digest)

    def get_dir(self, prefix: str, folder: Path, *, migration_id: str | None = None,
                sha256: str | None = None) -> Path:
        """Download a folder written by :meth:`put_dir`, checking each file's hash.

        ``migration_id``: the folder must lie under that migration's prefix. ``sha256``: the index must have
        this hash (the ref's). An index naming an absolute or ``..`` path is refused before anything is written.
        """
        if migration_id is not None:
            require_own_key(migration_id, prefix)
        index_key = f"{prefix}/_index.json"
        data = self.get_bytes(index_key)
        if sha256 is not None:
            _check_digest(index_key, hashlib.sha256(data).hexdigest(), sha256)
        index = _parse_index(index_key, data)
        root = folder.resolve()
        targets = {rel: _index_target(index_key, root, rel) for rel in index}
        for rel, digest in index.items():
            target = targets[rel]
            if target.is_file() and sha256_file(target) == digest:
                continue
            self.get_file(f"{prefix}/{rel}", target)
            if sha256_file(target) != digest:
                target.unlink(missing_ok=True)
                raise StoreError(f"artifact {prefix}/{rel} does not match its recorded sha256 (in {index_key})")
        return folder

    # ---------------------------------------------------------------- what events name, verified

    def read_ref(self, migration_id: str, ref: ArtifactRef) -> bytes:
        """The bytes of the object ``ref`` names, once its key is the migration's and its sha256 matches."""
        key = self._checked_ref(migration_id, ref)
        data = self.get_bytes(key)
        _check_digest(key, hashlib.sha256(data).hexdigest(), ref.sha256)
        return data

    def get_ref_file(self, migration_id: str, ref: ArtifactRef, path: Path) -> Path:
        """Download the object ``ref`` names to ``path`` and verify it (key and sha256); a mismatch removes it."""
        key = self._checked_ref(migration_id, ref)
        self.get_file(key, path)
        try:
            _check_digest(key, sha256_file(path), ref.sha256)
        except StoreError:
            path.unlink(missing_ok=True)
            raise
        return path

    def read_ref_models(self, migration_id: str, ref: ArtifactRef, model: type[M]) -> list[M]:
        """Every row of the JSONL object ``ref`` names, verified (see :meth:`get_ref_file`), as ``model``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.get_ref_file(migration_id, ref, Path(tmp) / "rows.jsonl")
            with path.open("rb") as f:
                return [model.model_validate_json(line) for line in f if line.strip()]

    def get_ref_dir(self, migration_id: str, ref: ArtifactRef, folder: Path) -> Path:
        """Download the folder ``ref`` names (:meth:`get_dir`), its key the migration's, its index ``ref.sha256``."""
        return self.get_dir(self._checked_ref(migration_id, ref), folder, migration_id=migration_id,
                            sha256=ref.sha256)

    def fetch_dataset_source(self, migration_id: str, uri: str, allowed_prefixes: Iterable[str] = ()) -> bytes:
        """The bytes of a ``dataset.source`` ``s3://<bucket>/<key>``: the installation's bucket, a key under the
        migration's own prefix or one of ``allowed_prefixes`` (``Settings.allowed_dataset_prefixes``).

        Raises :class:`~llamaduo.data.datasets.DatasetError` naming ``dataset.source`` otherwise.
        """
        from llamaduo.data.datasets import DatasetError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or bucket != self.bucket:
            raise DatasetError(f"dataset.source {uri}: only the installation's bucket {self.bucket!r} is readable")
        try:
            require_own_key(migration_id, key, allowed_prefixes)
        except StoreError as err:
            raise DatasetError(f"dataset.source {uri}: {err}") from None
        return self.get_bytes(key)

    def _checked_ref(self, migration_id: str, ref: ArtifactRef) -> str:
        if not ref.sha256:
            raise StoreError(f"artifact {ref.key!r} is named without a sha256: it cannot be verified")
        return require_own_key(migration_id, ref.key)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def _hashed_key(key: str, digest: str) -> str:
    """``key`` with ``-<first 12 hex of digest>`` before the extension of its last part."""
    head, _, name = key.rpartition("/")
    stem, dot, ext = name.partition(".")
    return f"{head}/{stem}-{digest[:12]}{dot}{ext}" if head else f"{stem}-{digest[:12]}{dot}{ext}"


def _check_digest(key: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise StoreError(f"artifact {key} does not match the sha256 it was published with (expected {expected}, "
                         f"read {actual}): it was changed or replaced after it was named")


def _parse_index(index_key: str, data: bytes) -> dict[str, str]:
    """A folder index (relative path -> sha256); refuse one naming an absolute, ``..`` or otherwise odd path."""
    index = json.loads(data)
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        raise StoreError(f"folder index {index_key} is not a mapping of paths to sha256 digests")
    for rel in index:
        if "\\" in rel or ":" in rel.partition("/")[0] or {"", ".", ".."} & {*rel.split("/")}:  # "": empty, /abs, a//b
            raise StoreError(f"folder index {index_key} names path {rel!r}: absolute or '..' paths are refused "
                             "(they would write outside the folder)")
    return index


def _index_target(index_key: str, root: Path, rel: str) -> Path:
    """Where the checked index entry ``rel`` goes under ``root``; refuse one that resolves outside it."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise StoreError(f"folder index {index_key} names path {rel!r}, which resolves outside the folder")
    return target


class SpecCache:
    """Specs by migration id, read once per process from ``migrations/{id}/spec.json``."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._specs: dict[str, Any] = {}

    def get(self, migration_id: str) -> Any:
        from llamaduo.contracts.spec import MigrationSpec

        if migration_id not in self._specs:
            self._specs[migration_id] = MigrationSpec.model_validate(self._store.get_json(spec_key(migration_id)))
        return self._specs[migration_id]
