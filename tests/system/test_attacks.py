"""Attacks over a real nats-server and S3 server: specs naming code the operator did not allow, another
migration's objects, folder indexes that escape their folder, and tampered adapters.

Every refusal names what is wrong; a judge worker dead-letters a refused spec's work without importing the code
and keeps serving; a tampered adapter is detected before it is loaded or served.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest
from support.bus import Recorder, controller

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import (
    DEAD_LETTER_FAMILY,
    ArtifactRef,
    JudgeItem,
    JudgeRequest,
    Subject,
    start_envelope,
)
from llamaduo.contracts.spec import MigrationSpec, parse_spec
from llamaduo.data.datasets import DatasetError, load_splits
from llamaduo.data.examples import Example
from llamaduo.errors import StoreError
from llamaduo.services.judge.app import register as register_judge
from llamaduo.storage.keys import data_key, migration_key, round_key, spec_key
from llamaduo.storage.store import ArtifactStore
from llamaduo.tasks.triage import make_dataset


def mid() -> str:
    return "m" + uuid.uuid4().hex[:10]


def spec(checker: str = "exact", oracle: str = "llamaduo.tasks.triage:oracle") -> MigrationSpec:
    return parse_spec({
        "task": {"name": "triage", "oracle": oracle}, "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama", "method": "full", "inference": {"max_new_tokens": 4}},
        "judge": {"method": "programmatic", "checker": checker},
    })


async def test_judge_dead_letters_disallowed_checkers_without_importing_them_and_keeps_serving(
    settings, store: ArtifactStore, marking_module: tuple[str, Path]
) -> None:
    name, mark = marking_module
    bad = {mid(): "os:abort", mid(): "shutil:rmtree", mid(): f"{name}:check"}
    good = mid()
    for m, checker in [*bad.items(), (good, "exact")]:
        store.put_json(spec_key(m), spec(checker).model_dump(mode="json"))
    items = [JudgeItem(item_id="a", instruction="route: invoice", reference="billing", candidate="billing")]
    bus = Bus(settings, "judge")
    register_judge(bus, store)
    await bus.broker.start()
    try:
        async with Recorder(settings) as rec:
            for m in [*bad, good]:
                await bus.emit(start_envelope(m, {}).follow(Subject.JUDGE_REQUEST,
                                                            JudgeRequest(batch=0, batches=1, items=items), key="j0"))
            [scored] = await rec.wait_for(Subject.EVAL_SCORED, timeout=30)
            for _ in range(200):
                letters = [json.loads(data) for subject, data in rec.raw if f"{DEAD_LETTER_FAMILY}." in subject]
                if len(letters) >= len(bad):
                    break
                await asyncio.sleep(0.05)
    finally:
        await bus.broker.stop()
    assert scored.migration_id == good and [s.similarity for s in scored.payload.scores] == [100]
    by_migration = {letter["migration_id"]: letter for letter in letters}
    assert set(by_migration) == set(bad)
    for m, checker in bad.items():
        letter = by_migration[m]
        assert letter["deliveries"] == 1, letter  # at once: no retry can make it allowed
        assert letter["reason"].startswith(f"permanent: judge.checker {checker!r}: refused: not an installed")
    assert not mark.exists() and name not in sys.modules


def test_another_migrations_s3_key_is_refused_as_a_dataset_source(store: ArtifactStore) -> None:
    victim, attacker = mid(), mid()
    rows = [{"instruction": f"secret {i}", "response": "x", "split": "test" if i % 2 else "train"}
            for i in range(4)]
    stolen = store.put_jsonl(data_key(victim, "test"), rows)
    source = parse_spec({"task": {"name": "t", "oracle": "llamaduo.tasks.triage:oracle"},
                         "dataset": {"source": f"s3://{store.bucket}/{stolen.key}"},
                         "student": {"base_model": "tiny:llama"}}).dataset
    with pytest.raises(DatasetError, match=f"not under migration {attacker}'s prefix"):
        load_splits(source, fetch_s3=lambda uri: store.fetch_dataset_source(attacker, uri))
    assert len(load_splits(source, fetch_s3=lambda uri: store.fetch_dataset_source(victim, uri)).test) == 2
    with pytest.raises(StoreError, match=f"not under migration {attacker}'s prefix"):
        store.read_ref(attacker, stolen)


def test_an_index_with_dotdot_is_refused_before_writing(store: ArtifactStore, tmp_path: Path) -> None:
    m = mid()
    prefix = round_key(m, 0, "adapter")
    store.put_bytes(f"{prefix}/escaped.sh", b"#!/bin/sh\n")  # what the index's path would fetch
    index = store.put_json(f"{prefix}/_index.json", {"../../../../escaped.sh": "0" * 64})
    folder = tmp_path / "a" / "b" / "c" / "d"
    with pytest.raises(StoreError, match=r"names path '\.\./\.\./\.\./\.\./escaped\.sh': absolute or '\.\.'"):
        store.get_ref_dir(m, ArtifactRef(key=prefix, sha256=index.sha256), folder)
    assert not list(tmp_path.rglob("escaped.sh"))


@pytest.fixture
def tampered_adapter(store: ArtifactStore, tmp_path: Path) -> tuple[str, ArtifactRef]:
    """An adapter folder as a round publishes it, then one byte of a file changed and its index made to match."""
    m = mid()
    store.put_json(spec_key(m), spec().model_dump(mode="json"))
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (src / "adapter_config.json").write_text('{"r": 4}')
    ref = store.put_dir(round_key(m, 0, "adapter"), src, once=True)
    weights = bytearray(store.get_bytes(f"{ref.key}/adapter_model.safetensors"))
    weights[100] ^= 0xFF
    store.put_bytes(f"{ref.key}/adapter_model.safetensors", bytes(weights))
    index = store.get_json(f"{ref.key}/_index.json")
    index["adapter_model.safetensors"] = store.stored_sha256(f"{ref.key}/adapter_model.safetensors")
    store.put_json(f"{ref.key}/_index.json", index)
    return m, ref


def test_a_tampered_adapter_is_not_loaded_for_inference(
    store: ArtifactStore, tmp_path: Path, tampered_adapter: tuple[str, ArtifactRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamaduo.services.inference import domain
    from llamaduo.services.inference.shards import predict_round

    m, ref = tampered_adapter
    loaded: list[Path] = []
    monkeypatch.setattr(domain, "load_generator", lambda student, folder: loaded.append(folder))
    test = [Example(id="t1", instruction="route: invoice", response="billing")]
    with pytest.raises(StoreError, match=r"_index\.json does not match the sha256 it was published with"):
        predict_round(store, spec(), test, m, 0, ref, tmp_path / "model")
    assert loaded == [] and not store.exists(round_key(m, 0, "predictions.jsonl"))


def test_a_tampered_adapter_is_not_served(
    store: ArtifactStore, tmp_path: Path, tampered_adapter: tuple[str, ArtifactRef]
) -> None:
    from llamaduo.services.inference.serve_after import Servers, serve_completed
    from llamaduo.serving.migration import fetch_migration_model

    m, ref = tampered_adapter
    serve = spec().model_copy(update={"serve": spec().serve.model_copy(update={"enabled": True, "port": 0})})
    servers: Servers = {}
    with pytest.raises(StoreError, match="does not match the sha256 it was published with"):
        serve_completed(store, serve, m, servers, tmp_path / "serving", model_key=ref.key, model_sha256=ref.sha256)
    assert servers == {}
    # `llamaduo serve --migration`: the report names the judged model with its hash
    store.put_json(migration_key(m, "report.json"), {"model": ref.model_dump(mode="json")})
    with pytest.raises(StoreError, match="does not match the sha256 it was published with"):
        fetch_migration_model(store, m, tmp_path / "cli")
    with pytest.raises(StoreError, match="does not match the sha256 it was published with"):
        serve_completed(store, serve, m, servers, tmp_path / "serving", model_key=ref.key)
    assert servers == {}


async def test_controller_refuses_disallowed_code_and_other_migrations_data_at_start(
    settings, store: ArtifactStore, tmp_path: Path, marking_module: tuple[str, Path]
) -> None:
    name, mark = marking_module
    data = tmp_path / "triage.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_dataset(n_train=8, n_test=4)))
    victim = mid()
    stolen = store.put_bytes(data_key(victim, "train"), data.read_bytes())

    def start(m: str, **fields: object) -> dict:
        base = spec().model_dump(mode="json")
        base["dataset"]["source"] = str(data)
        for path, value in fields.items():
            section, field = path.split("__")
            base[section][field] = value
        return base

    bad = {mid(): ("judge.checker 'os:abort'", start("", judge__checker="os:abort")),
           mid(): ("task.oracle 'shutil:rmtree'", start("", task__oracle="shutil:rmtree")),
           mid(): (f"judge.checker '{name}:check'", start("", judge__checker=f"{name}:check")),
           mid(): ("not under migration", start("", dataset__source=f"s3://{store.bucket}/{stolen.key}"))}
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "player")
        await player.broker.connect()
        for m, (_, body) in bad.items():
            await player.emit(start_envelope(m, body))
        await rec.wait_for(Subject.MIGRATION_FAILED, count=len(bad), timeout=30)
        await ctl.broker.stop()
        await player.broker.stop()
    failed = {e.migration_id: e.payload for e in rec.of(Subject.MIGRATION_FAILED)}
    for m, (field, _) in bad.items():
        assert failed[m].reason in ("spec", "dataset") and field in failed[m].detail, failed[m]
    assert not rec.of(Subject.TRAIN_REQUEST) and not mark.exists()
