"""Isolation and integrity of what specs and events name, against a real S3 server: keys under the migration's
prefix, folder indexes that cannot write outside their folder, sha256 checked on read, write-once artifacts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from llamaduo.contracts.events import ArtifactRef
from llamaduo.data.datasets import DatasetError
from llamaduo.errors import StoreError
from llamaduo.storage.keys import migration_key, require_own_key, round_key
from llamaduo.storage.store import ArtifactStore


def mid() -> str:
    return "m" + uuid.uuid4().hex[:10]


def adapter_folder(tmp_path: Path) -> Path:
    src = tmp_path / "adapter-src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    return src


@pytest.mark.parametrize(("key", "why"), [
    ("migrations/other-1/data/test.jsonl", "not under migration m-1's prefix 'migrations/m-1/'"),
    ("migrations/m-10/data/test.jsonl", "not under migration m-1's prefix"),
    ("migrations/m-1/../other-1/data/test.jsonl", "'..' parts"),
    ("/migrations/m-1/data/test.jsonl", "absolute"),
    ("migrations/m-1//x", "empty"),
    ("datasets/shared.jsonl", "not under migration m-1's prefix"),
])
def test_keys_outside_the_migration_are_refused(key: str, why: str) -> None:
    with pytest.raises(StoreError, match="artifact key") as info:
        require_own_key("m-1", key)
    assert repr(key) in str(info.value) and why in str(info.value)


def test_own_keys_and_operator_prefixes_pass() -> None:
    assert require_own_key("m-1", "migrations/m-1/data/test.jsonl") == "migrations/m-1/data/test.jsonl"
    assert require_own_key("m-1", "datasets/shared.jsonl", ["datasets/"]) == "datasets/shared.jsonl"
    with pytest.raises(StoreError):
        require_own_key("m-1", "datasets-evil/x.jsonl", ["datasets"])


def test_another_migrations_s3_dataset_source_is_refused(store: ArtifactStore) -> None:
    victim, attacker = mid(), mid()
    secret = store.put_bytes(migration_key(victim, "data", "test.jsonl"), b'{"instruction": "secret"}\n')
    uri = f"s3://{store.bucket}/{secret.key}"
    with pytest.raises(DatasetError, match=rf"dataset.source {uri}: artifact key .* not under migration {attacker}"):
        store.fetch_dataset_source(attacker, uri)
    with pytest.raises(DatasetError, match="only the installation's bucket"):
        store.fetch_dataset_source(attacker, f"s3://other-bucket/{secret.key}")
    own = store.put_bytes(migration_key(attacker, "upload", "coverage.jsonl"), b"{}\n")
    assert store.fetch_dataset_source(attacker, f"s3://{store.bucket}/{own.key}") == b"{}\n"
    shared = store.put_bytes(f"datasets/{attacker}.jsonl", b"[]")
    assert store.fetch_dataset_source(attacker, f"s3://{store.bucket}/{shared.key}", ["datasets/"]) == b"[]"


def test_refs_of_another_migration_or_without_hash_are_refused(store: ArtifactStore) -> None:
    victim, attacker = mid(), mid()
    ref = store.put_jsonl(migration_key(victim, "data", "train.jsonl"), [{"id": "1"}])
    with pytest.raises(StoreError, match=f"not under migration {attacker}"):
        store.read_ref(attacker, ref)
    with pytest.raises(StoreError, match="without a sha256"):
        store.read_ref(victim, ArtifactRef(key=ref.key))
    assert json.loads(store.read_ref(victim, ref)) == {"id": "1"}


@pytest.mark.parametrize("bad", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/escaped.txt", "a\\..\\b", ""])
def test_an_index_with_absolute_or_dotdot_paths_is_refused(store: ArtifactStore, tmp_path: Path, bad: str) -> None:
    m = mid()
    prefix = round_key(m, 0, "adapter")
    store.put_bytes(f"{prefix}/x", b"evil")
    store.put_json(f"{prefix}/_index.json", {bad: "0" * 64})
    folder = tmp_path / "deep" / "folder"
    with pytest.raises(StoreError, match=rf"folder index {prefix}/_index.json names path") as info:
        store.get_dir(prefix, folder)
    assert repr(bad) in str(info.value)
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not folder.exists()


def test_sha256_is_checked_on_read(store: ArtifactStore, tmp_path: Path) -> None:
    m = mid()
    ref = store.put_jsonl(migration_key(m, "data", "train.jsonl"), [{"id": "a", "instruction": "i", "response": "r"}])
    from llamaduo.data.examples import Example

    assert [e.id for e in store.read_ref_models(m, ref, Example)] == ["a"]
    store.put_jsonl(ref.key, [{"id": "b", "instruction": "i", "response": "tampered"}])  # replaced behind its back
    with pytest.raises(StoreError, match=rf"artifact {ref.key} does not match the sha256 it was published with"):
        store.read_ref_models(m, ref, Example)
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.read_ref(m, ref)
    target = tmp_path / "rows.jsonl"
    with pytest.raises(StoreError):
        store.get_ref_file(m, ref, target)
    assert not target.exists()


def test_a_tampered_folder_and_index_is_detected_by_the_refs_hash(store: ArtifactStore, tmp_path: Path) -> None:
    m = mid()
    ref = store.put_dir(round_key(m, 0, "adapter"), adapter_folder(tmp_path))
    assert (store.get_ref_dir(m, ref, tmp_path / "ok") / "sub" / "config.json").read_text() == '{"a": 1}'
    # one byte of a file changed: the index catches it
    store.put_bytes(f"{ref.key}/weights.bin", b"\x00\x02" + b"\x00\x01" * 999)
    with pytest.raises(StoreError, match=rf"artifact {ref.key}/weights.bin does not match its recorded sha256"):
        store.get_ref_dir(m, ref, tmp_path / "file-tampered")
    # the index rewritten to match: only the ref's hash (the published one) catches it
    index = store.get_json(f"{ref.key}/_index.json")
    index["weights.bin"] = store.stored_sha256(f"{ref.key}/weights.bin")
    store.put_json(f"{ref.key}/_index.json", index)
    store.get_dir(ref.key, tmp_path / "unverified")  # the folder alone looks consistent
    with pytest.raises(StoreError, match=rf"artifact {ref.key}/_index.json does not match the sha256 it was published"):
        store.get_ref_dir(m, ref, tmp_path / "index-tampered")
    assert not (tmp_path / "index-tampered").exists()
    with pytest.raises(StoreError, match="not under migration"):
        store.get_ref_dir(mid(), ref, tmp_path / "other")


def test_write_once_never_replaces_what_was_published(store: ArtifactStore, tmp_path: Path) -> None:
    m = mid()
    key = round_key(m, 0, "predictions.jsonl")
    first = store.put_jsonl(key, [{"a": 1}], once=True)
    assert first.key == key
    assert store.put_jsonl(key, [{"a": 1}], once=True) == first  # a redelivery with the same content: as is
    second = store.put_jsonl(key, [{"a": 2}], once=True)  # different content: a key with its hash
    assert second.key == round_key(m, 0, f"predictions-{second.sha256[:12]}.jsonl") and second.sha256 != first.sha256
    assert list(store.iter_jsonl(key)) == [{"a": 1}] and store.read_ref(m, first)
    assert store.put_jsonl(key, [{"a": 2}], once=True) == second

    src = adapter_folder(tmp_path)
    prefix = round_key(m, 0, "adapter")
    adapter = store.put_dir(prefix, src, once=True)
    assert store.put_dir(prefix, src, once=True) == adapter
    (src / "weights.bin").write_bytes(b"retrained")
    again = store.put_dir(prefix, src, once=True)
    assert again.key == f"{prefix}-{again.sha256[:12]}" and again.sha256 != adapter.sha256
    assert (store.get_ref_dir(m, adapter, tmp_path / "first") / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert (store.get_ref_dir(m, again, tmp_path / "second") / "weights.bin").read_bytes() == b"retrained"
    # without once (checkpoints), a folder is overwritten as before
    assert store.put_dir(prefix, src).key == prefix
