"""The judge service and the holdout: a holdout batch of a round whose judging was closed early is still judged,
its scores stored apart (round-N/holdout/scores/), the split echoed in eval.scored."""

from __future__ import annotations

from typing import Any

from faststream.nats import TestNatsBroker

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import JudgeItem, JudgeRequest, Score, Subject, parse_event, start_envelope
from llamaduo.contracts.spec import parse_spec
from llamaduo.services.judge.app import register
from llamaduo.storage.keys import batch_scores_key, judging_closed_key, spec_key

SPEC = parse_spec({
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"method": "programmatic", "checker": "exact"},
}).model_dump(mode="json")


async def test_holdout_batches_are_judged_even_when_the_round_was_closed(settings: Any, store: Any) -> None:
    mid = "m-holdout-judge"
    store.put_json(spec_key(mid), SPEC)
    store.put_json(judging_closed_key(mid, 1), {"round": 1})  # round 1 closed early by the sequential test
    bus = Bus(settings, "judge")
    register(bus, store)
    items = [JudgeItem(item_id="h1", instruction="q", reference="billing", candidate="billing")]
    start = start_envelope(mid, {})
    eval_req = start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=3, batches=4, items=items), round=1, key="e")
    holdout_req = start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=0, batches=1, items=items, split="holdout"),
                               round=1, key="h")
    async with TestNatsBroker(bus.broker) as broker:
        await broker.publish(eval_req.to_bytes(), settings.subject(Subject.JUDGE_REQUEST))
        await broker.publish(holdout_req.to_bytes(), settings.subject(Subject.JUDGE_REQUEST))
        mock = bus.publisher(Subject.EVAL_SCORED).mock
        assert mock is not None
        scored = [parse_event(call.args[0]) for call in mock.call_args_list]
    assert [(s.round, s.payload.batch, s.payload.split) for s in scored] == [(1, 0, "holdout")]  # eval one skipped
    assert scored[0].payload.scores[0].similarity == 100
    assert store.read_models(batch_scores_key(mid, 1, 0, "holdout"), Score)[0].item_id == "h1"
    assert not store.exists(batch_scores_key(mid, 1, 0)) and not store.exists(batch_scores_key(mid, 1, 3))
