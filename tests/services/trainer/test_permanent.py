"""Trainer work that no retry can fix, over a real nats-server and S3 server: rows that cannot fit
``student.training.max_length`` and a base model that cannot be resolved are dead-lettered after ONE delivery,
with a reason naming the field; through the controller, the migration fails with that reason."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nats
import pytest
from support.bus import Recorder, controller

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, TrainRequest, start_envelope
from llamaduo.data.examples import Example
from llamaduo.models import resolve
from llamaduo.models.resolve import ModelResolutionError
from llamaduo.services.trainer import app
from llamaduo.storage.keys import data_key, spec_key
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
LONG = ("Please read the following customer message carefully and decide which single support queue should handle "
        "it, taking into account the product, the billing history, the shipping status and any previous "
        "conversation with our agents before answering with the name of that one queue only")


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every delivery that reached training (the app's ``train_round``), by migration id."""
    calls: list[str] = []
    real = app.train_round

    def counted(store: Any, spec: Any, rows: Any, migration_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(migration_id)
        return real(store, spec, rows, migration_id, *args, **kwargs)

    monkeypatch.setattr(app, "train_round", counted)
    return calls


def spec_dict(source: str, base_model: str = "tiny:llama", max_length: int = 128) -> dict:
    return {
        "task": {"name": "triage", "system_prompt": SYSTEM, "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": source},
        "student": {"base_model": base_model, "method": "full",
                    "training": {"epochs": 1, "batch_size": 4, "max_length": max_length}},
        "judge": {"threshold": 90, "batch_size": 5},
        "budget": {"max_rounds": 2},
    }


def long_rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"long-{i}", "instruction": f"{LONG} (ticket {i})", "response": "billing", "split": "train"}
            for i in range(n)]


async def dead_letters(settings: Any, count: int, timeout: float = 20.0) -> list[dict]:
    """The installation's dead letters, once ``count`` are in (or ``timeout`` passed), plus a second to show
    that no more come."""
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(settings.subject("dlq.>"), stream=settings.stream_name, ordered_consumer=True)
    out: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            try:
                msg = await sub.next_msg(timeout=1.0 if len(out) >= count else 0.5)
            except nats.errors.TimeoutError:
                if len(out) >= count:
                    break
                continue
            out.append(json.loads(msg.data))
    finally:
        await nc.close()
    return out


async def test_rows_that_cannot_fit_are_dead_lettered_after_one_delivery(settings, store, train_calls) -> None:  # type: ignore[no-untyped-def]
    too_long, unknown = "m" + uuid.uuid4().hex[:10], "m" + uuid.uuid4().hex[:10]
    for mid, base in ((too_long, "tiny:llama"), (unknown, "tiny:no-such-preset")):
        store.put_json(spec_key(mid), spec_dict("unused.jsonl", base_model=base))
    rows = [Example.model_validate(r) for r in long_rows(16)]
    requests = []
    for mid in (too_long, unknown):
        ref = store.put_jsonl(data_key(mid, "train"), rows)
        requests.append(start_envelope(mid, {}).follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[ref], rows=16)))

    bus = Bus(settings, "trainer")
    app.register(bus, store)
    async with bus.broker:
        await bus.broker.start()
        for request in requests:
            await bus.emit(request)
        letters = await dead_letters(settings, count=2)
    by_mid = {letter["migration_id"]: letter for letter in letters}
    assert len(letters) == 2 and set(by_mid) == {too_long, unknown}
    assert sorted(train_calls) == sorted([too_long, unknown])  # one delivery each, no retries

    letter = by_mid[too_long]
    assert letter["deliveries"] == 1 and letter["service"] == "trainer"
    assert letter["reason"].startswith("permanent: student.training.max_length 128: all 16 training rows are longer")
    assert "raise student.training.max_length to at least" in letter["reason"]
    letter = by_mid[unknown]
    assert letter["deliveries"] == 1
    assert letter["reason"].startswith("permanent: unknown tiny preset 'no-such-preset'")


def test_only_an_unreachable_hub_is_worth_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    def unreachable(*args: Any, **kwargs: Any) -> str:
        raise ConnectionError("hub down")

    def unknown(*args: Any, **kwargs: Any) -> str:
        raise HFValidationError("not a repository id")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelResolutionError) as caught:
        resolve.resolve_base_model("someone/some-model")
    assert caught.value.retryable
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unknown)
    with pytest.raises(ModelResolutionError) as caught:
        resolve.resolve_base_model("someone/some-model")
    assert not caught.value.retryable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelResolutionError) as caught:
        resolve.resolve_base_model("someone/some-model")
    assert not caught.value.retryable  # offline without a cached copy: the installation must change


async def test_migration_whose_rows_cannot_fit_fails_without_retries(  # type: ignore[no-untyped-def]
    settings, store, train_calls, tmp_path: Path
) -> None:
    data = tmp_path / "long.jsonl"
    test_rows = [r for r in make_dataset(n_train=0, n_test=8, seed=3) if r["split"] == "test"]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*long_rows(16), *test_rows]))
    mid = "m" + uuid.uuid4().hex[:10]
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        trainer = Bus(settings, "trainer")
        app.register(trainer, store)
        await trainer.broker.start()
        await trainer.emit(start_envelope(mid, spec_dict(str(data))))
        [failed] = await rec.wait_for(Subject.MIGRATION_FAILED, timeout=30.0)
        await asyncio.sleep(1.0)  # time for a redelivery, were there one
        await trainer.broker.stop()
        await ctl.broker.stop()
    assert train_calls == [mid]
    assert len(rec.of(Subject.TRAIN_REQUEST)) == 1 and not rec.of(Subject.TRAIN_DONE)
    assert failed.migration_id == mid and failed.payload.reason == "dead_letter"
    assert "student.training.max_length 128: all 16 training rows are longer" in failed.payload.detail
