"""The one artifact store client: datasets, adapters, predictions and reports in any S3 server.

Keys live under ``migrations/{migration_id}/...`` and are built only from validated ids, so a migration
cannot address another one's objects. Large objects stream through temporary files; nothing is read whole
unless the caller asks for bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from llamaduo.contracts.events import ArtifactRef
from llamaduo.errors import StoreError
from llamaduo.settings import Settings
from llamaduo.storage.keys import spec_key

_CHUNK = 1 << 20
M = TypeVar("M", bound=BaseModel)


def sha256_file(path: Path) -> str:
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

    def put_file(self, key: str, path: Path, *, rows: int | None = None) -> ArtifactRef:
        digest = sha256_file(path)
        self._client.fput_object(self.bucket, key, str(path), metadata={"sha256": digest})
        return ArtifactRef(key=key, sha256=digest, rows=rows)

    def put_bytes(self, key: str, data: bytes, *, rows: int | None = None) -> ArtifactRef:
        digest = hashlib.sha256(data).hexdigest()
        self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), metadata={"sha256": digest})
        return ArtifactRef(key=key, sha256=digest, rows=rows)

    def put_json(self, key: str, value: Any) -> ArtifactRef:
        return self.put_bytes(key, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

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

    # ---------------------------------------------------------------- JSON lines, streamed

    def put_jsonl(self, key: str, rows: Iterable[BaseModel | dict[str, Any]]) -> ArtifactRef:
        """Write rows one by one to a temp file, then upload it: memory stays flat for any size."""
        count = 0
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as tmp:
            for row in rows:
                line = row.model_dump_json() if isinstance(row, BaseModel) else json.dumps(row)
                tmp.write(line.encode() + b"\n")
                count += 1
        try:
            return self.put_file(key, Path(tmp.name), rows=count)
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

    def put_dir(self, prefix: str, folder: Path) -> ArtifactRef:
        """Upload every file under ``folder``; the index (names + hashes) is written last, so a reader
        that finds ``_index.json`` finds a complete folder."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        index = {}
        for p in files:
            rel = p.relative_to(folder).as_posix()
            index[rel] = self.put_file(f"{prefix}/{rel}", p).sha256
        ref = self.put_json(f"{prefix}/_index.json", index)
        return ArtifactRef(key=prefix, sha256=ref.sha256)

    def get_dir(self, prefix: str, folder: Path) -> Path:
        """Download a folder written by :meth:`put_dir`, checking each file's hash."""
        index: dict[str, str] = self.get_json(f"{prefix}/_index.json")
        for rel, digest in index.items():
            target = folder / rel
            if target.is_file() and sha256_file(target) == digest:
                continue
            self.get_file(f"{prefix}/{rel}", target)
            if sha256_file(target) != digest:
                raise StoreError(f"artifact {prefix}/{rel} does not match its recorded sha256")
        return folder


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
