"""Handler wiring with FastStream's in-memory test broker (no nats-server); artifacts on the real S3 server."""

import pytest
from faststream.nats import TestNatsBroker

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import (
    ArtifactRef,
    JudgeItem,
    JudgeRequest,
    Subject,
    SynthRequest,
    parse_event,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.data.examples import Example
from llamaduo.services.judge.app import register as register_judge
from llamaduo.services.synthesizer.app import register as register_synth
from llamaduo.storage.keys import data_key, spec_key
from llamaduo.tasks.triage import make_dataset

SPEC = parse_spec({
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "synthesis": {"samples_per_round": 8, "examples_per_call": 4, "seeds_per_call": 2},
})


@pytest.fixture
def migration(store):
    mid = "m-wiring"
    store.put_json(spec_key(mid), SPEC.model_dump(mode="json"))
    rows = make_dataset(n_train=30, n_test=10, seed=5)
    for split in ("train", "test"):
        store.put_jsonl(data_key(mid, split), [Example(**{k: r[k] for k in ("id", "instruction", "response")})
                                                for r in rows if r["split"] == split])
    return mid


def published(bus: Bus, name: Subject) -> list:
    mock = bus.publisher(name).mock
    return [parse_event(call.args[0]) for call in mock.call_args_list] if mock else []


async def test_judge_request_produces_eval_scored(settings, store, migration):
    bus = Bus(settings, "judge")
    register_judge(bus, store)
    items = [JudgeItem(item_id="a", instruction="Route this ticket: my invoice", reference="billing",
                       candidate="billing"),
             JudgeItem(item_id="b", instruction="Route this ticket: my parcel", reference="shipping",
                       candidate="billing")]
    req = start_envelope(migration, {}).follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=3, batches=4, items=items),
                                               key="j3")
    async with TestNatsBroker(bus.broker) as br:
        await br.publish(req.to_bytes(), settings.subject(Subject.JUDGE_REQUEST))
        [scored] = published(bus, Subject.EVAL_SCORED)
    assert scored.causation_id == req.event_id and scored.payload.batch == 3
    assert [(s.item_id, s.similarity) for s in scored.payload.scores] == [("a", 100), ("b", 1)]
    assert scored.payload.provider.startswith("simulated") and scored.payload.usage.simulated


async def test_synth_request_writes_dataset_and_reports(settings, store, migration):
    bus = Bus(settings, "synthesizer")
    register_synth(bus, store)
    req = start_envelope(migration, {}).follow(Subject.SYNTH_REQUEST, SynthRequest(samples=8), round=1, key="s")
    async with TestNatsBroker(bus.broker) as br:
        await br.publish(req.to_bytes(), settings.subject(Subject.SYNTH_REQUEST))
        [ready] = published(bus, Subject.SYNTH_READY)
    ref: ArtifactRef = ready.payload.dataset
    rows = list(store.iter_jsonl(ref.key))
    assert ref.key == f"migrations/{migration}/round-1/synthetic.jsonl" and ref.rows == len(rows) == ready.payload.kept
    assert 0 < ready.payload.kept <= 8 and ready.payload.generated >= ready.payload.kept
    train_ids = {r["id"] for r in store.iter_jsonl(data_key(migration, "train"))}
    assert set(ready.payload.seed_ids) <= train_ids
    assert all(r["source"] == "synthetic:1" for r in rows)
