"""Serving after completion, against a real S3 server (no bus): the inference service's helper fetches a completed
migration's chosen model, serves it from a thread, and the official openai client talks to it. Also the merged
model a ``student.export_merged`` round uploads, served as a plain model next to the adapter."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from openai import OpenAI

from llamaduo.contracts.spec import MigrationSpec, spec_to_dict
from llamaduo.data.examples import Example
from llamaduo.errors import StoreError
from llamaduo.services.inference.domain import StudentGenerator
from llamaduo.services.inference.serve_after import Servers, serve_completed
from llamaduo.services.trainer.rounds import export_merged_round, train_round
from llamaduo.serving.migration import fetch_migration_model
from llamaduo.serving.server import BackgroundServer
from llamaduo.storage.keys import migration_key, round_key, spec_key
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
ROWS = make_dataset(n_train=16, n_test=3)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
PROMPTS = [r["instruction"] for r in ROWS if r["split"] == "test"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def migration_spec(**serve: object) -> MigrationSpec:
    return MigrationSpec.model_validate({
        "task": {"name": "triage", "system_prompt": SYSTEM, "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": "unused.jsonl"},
        "student": {"base_model": "tiny:llama", "method": "lora", "export_merged": True,
                    "lora": {"r": 4, "dropout": 0.0},
                    "training": {"epochs": 6, "learning_rate": 1e-2, "batch_size": 8, "max_length": 128},
                    "inference": {"max_new_tokens": 6}},
        "serve": serve,
    })


def completed(store, spec: MigrationSpec) -> str:  # type: ignore[no-untyped-def]
    """A new migration id whose spec is in the store (as the controller leaves it)."""
    mid = "m" + uuid.uuid4().hex[:10]
    store.put_json(spec_key(mid), spec_to_dict(spec))
    return mid


@pytest.fixture
def serving() -> Iterator[Servers]:
    running: Servers = {}
    yield running
    for server in running.values():
        server.stop()


def test_completed_migration_is_served_and_answers_the_openai_client(  # type: ignore[no-untyped-def]
    store, tmp_path: Path, serving: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    spec = migration_spec(enabled=True, port=0)
    first = completed(store, spec)
    work = tmp_path / "train"
    _, adapter = train_round(store, spec, TRAIN, first, 0, work)
    merged = export_merged_round(store, spec, first, 0, work)
    assert merged is not None and merged.key == round_key(first, 0, "merged")
    assert store.exists(f"{merged.key}/_index.json")
    assert not store.exists(f"{round_key(first, 1, 'merged')}/_index.json")
    assert export_merged_round(store, spec.model_copy(update={"student": spec.student.model_copy(
        update={"export_merged": False})}), first, 0, work) is None

    # what `llamaduo serve --migration` resolves from the report equals what the event names
    store.put_json(migration_key(first, "report.json"), {"model": adapter.model_dump(mode="json")})
    folder, fetched = fetch_migration_model(store, first, tmp_path / "cli-cache")
    assert fetched == spec and (folder / "adapter_config.json").is_file()

    cache = tmp_path / "serving"
    server = serve_completed(store, spec, first, serving, cache, model_key=adapter.key)
    assert isinstance(server, BackgroundServer) and server.url
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    expected = StudentGenerator.load(spec.student, folder).generate(PROMPTS, SYSTEM)
    # the request sends only the user's text: the migration's system prompt and max_new_tokens are its defaults
    responses = [client.chat.completions.create(model=first, messages=[{"role": "user", "content": p}])
                 for p in PROMPTS]
    answers = [r.choices[0].message.content for r in responses]
    assert answers == [a for [a] in expected] and any(answers)
    tokenizer = server.registry.get(first).tokenizer
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user",
                                                 "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    assert responses[0].usage.prompt_tokens == len(tokenizer(with_system, add_special_tokens=False)["input_ids"])
    assert all(r.usage.completion_tokens <= 6 for r in responses)

    # a second completion on the same address adds its model (here: the merged folder, a plain model)
    # (a migration serves only its own folders: the merged model is copied under the second one's prefix)
    second = completed(store, migration_spec(enabled=True, port=0, model_name="triage-merged"))
    with pytest.raises(StoreError, match=f"not under migration {second}"):
        fetch_migration_model(store, second, tmp_path / "refused", model_key=merged.key, model_sha256=merged.sha256)
    copied = store.put_dir(round_key(second, 0, "merged"), store.get_dir(merged.key, tmp_path / "merged-copy"))
    again = serve_completed(store, migration_spec(enabled=True, port=0, model_name="triage-merged"), second,
                            serving, cache, model_key=copied.key, model_sha256=copied.sha256)
    assert again is server
    assert [m.id for m in client.models.list().data] == [first, "triage-merged"]
    merged_answers = [client.chat.completions.create(model="triage-merged", messages=[{"role": "user", "content": p}])
                      .choices[0].message.content for p in PROMPTS]
    assert merged_answers == answers  # the merged model is the adapter on its base

    # a redelivered completion replaces the model of that name; the server keeps serving both
    with caplog.at_level(logging.INFO, logger="llamaduo.inference"):
        serve_completed(store, spec, first, serving, cache, model_key=adapter.key)
    assert "replaced" in caplog.text
    assert [m.id for m in client.models.list().data] == [first, "triage-merged"]

    # not asked: nothing served
    quiet = migration_spec()
    assert serve_completed(store, quiet, completed(store, quiet), serving, cache, model_key=adapter.key) is None


def test_a_taken_port_is_logged_not_raised(  # type: ignore[no-untyped-def]
    store, tmp_path: Path, serving: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = migration_spec(enabled=True, port=port)
        mid = completed(store, spec)
        index = store.put_bytes(f"{migration_key(mid, 'round-0', 'adapter')}/_index.json", b"{}")  # no model
        with caplog.at_level(logging.ERROR, logger="llamaduo.inference"):
            assert serve_completed(store, spec, mid, serving, tmp_path, model_key=migration_key(
                mid, "round-0", "adapter"), model_sha256=index.sha256) is None
    assert f"cannot serve migration {mid}" in caplog.text and f"127.0.0.1:{port}" in caplog.text
    assert serving[("127.0.0.1", port)].url is None
