"""The artifact store against a real S3 server."""

import pytest

from llamaduo.storage.keys import migration_key, round_key
from llamaduo.storage.store import StoreError, sha256_file


def test_keys_are_built_only_from_valid_parts():
    assert round_key("m-1", 2, "adapter") == "migrations/m-1/round-2/adapter"
    with pytest.raises(ValueError, match="migration_id"):
        migration_key("../other", "x")
    with pytest.raises(StoreError, match="not allowed"):
        migration_key("m-1", "..", "x")
    with pytest.raises(StoreError, match="not allowed"):
        migration_key("m-1", "a/b")


def test_jsonl_streams_rows_and_records_hash(store):
    rows = [{"i": i, "text": "x" * 100} for i in range(5000)]
    ref = store.put_jsonl("migrations/m-1/data/big.jsonl", rows)
    assert ref.rows == 5000 and len(ref.sha256) == 64
    assert list(store.iter_jsonl(ref.key)) == rows
    assert store.exists(ref.key) and not store.exists("migrations/m-1/data/none.jsonl")


def test_folder_roundtrip_checks_hashes(store, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    ref = store.put_dir("migrations/m-1/round-0/adapter", src)
    out = store.get_dir(ref.key, tmp_path / "copy")
    assert sha256_file(out / "weights.bin") == sha256_file(src / "weights.bin")
    assert (out / "sub" / "config.json").read_text() == '{"a": 1}'
    store.put_bytes("migrations/m-1/round-0/adapter/weights.bin", b"tampered")
    with pytest.raises(StoreError, match="does not match"):
        store.get_dir(ref.key, tmp_path / "copy2")
