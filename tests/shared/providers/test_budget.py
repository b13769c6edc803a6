"""The service-LLM budget, enforced before each call: the ledger, the guarded provider, the judge and the
synthesizer under a budget, the controller failing the migration with reason ``budget``."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import pytest

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    JudgeItem,
    JudgeRequest,
    MigrationFailed,
    Score,
    Subject,
    SynthReady,
    SynthRequest,
    TrainDone,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import BudgetSpec, JudgeSpec, ProviderSpec, SynthesisSpec, TaskSpec, parse_spec
from llamaduo.data.examples import Example
from llamaduo.providers.base import ChatMessage, Completion, CompletionRequest, Provider, ProviderError
from llamaduo.providers.budget import (
    BudgetedProvider,
    BudgetExhausted,
    KVLedger,
    MemoryLedger,
    Spend,
    budgeted_provider,
    estimate_call,
    with_budget,
)
from llamaduo.providers.pricing import Price
from llamaduo.services.controller import domain
from llamaduo.services.judge.domain import JudgeCache, judge_items
from llamaduo.services.synthesizer.domain import synthesize
from llamaduo.tasks.triage import make_dataset

TASK = TaskSpec(name="triage", oracle="llamaduo.tasks.triage:oracle")


class CountingProvider(Provider):
    """Answers every request like the oracle would, reporting fixed token counts; counts the calls made."""

    name = "counting"

    def __init__(self, input_tokens: int = 100, output_tokens: int = 20, price: Price | None = None,
                 fail: bool = False) -> None:
        super().__init__(ProviderSpec(model="fake"), TASK)
        self.calls = 0
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.fail = fail
        if price is not None:
            self.price = price

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        await asyncio.sleep(0.001)
        if self.fail:
            raise ProviderError("server down", retryable=False)
        if request.purpose == "judge":
            text = json.dumps({"similarity": 80, "precision": 80, "reason": "ok"})
        else:
            n = int(request.context.get("n", 1))
            text = json.dumps({"examples": [
                {"instruction": f"synthetic ticket {self.calls}-{i} {uuid.uuid4().hex}", "response": "billing"}
                for i in range(n)]})
        price = getattr(self, "price", None)
        cost = price.cost(self.input_tokens, self.output_tokens) if price else 0.0
        return Completion(text=text, input_tokens=self.input_tokens, output_tokens=self.output_tokens, cost=cost)


def judge_request(text: str = "x" * 400, max_tokens: int | None = 100) -> CompletionRequest:
    return CompletionRequest(purpose="judge", messages=[ChatMessage(role="user", content=text)],
                             max_tokens=max_tokens)


# ------------------------------------------------------------------------------------------ provider


def test_estimate_is_prompt_plus_max_tokens():
    assert estimate_call(judge_request("x" * 400, 100)) == (100, 100)
    synth = CompletionRequest(purpose="synthesize", messages=[ChatMessage(role="user", content="x" * 40)],
                              context={"n": 3, "seeds": [{"instruction": "a" * 40, "response": "b" * 40}]})
    prompt, reply = estimate_call(synth)
    assert prompt == 10 and reply == 2 * 20 * 3 + 64


async def test_a_call_that_could_exceed_the_token_budget_is_not_made():
    inner = CountingProvider(input_tokens=100, output_tokens=20)  # 120 used; 200 reserved per call
    guarded = BudgetedProvider(inner, BudgetSpec(max_service_tokens=600), MemoryLedger())
    made = 0
    with pytest.raises(BudgetExhausted) as err:
        for _ in range(10):
            await guarded.complete(judge_request())
            made += 1
    # 120 spent per call; the next is made only while spent + 200 <= 600: calls 1-4 (spent 480)
    assert made == inner.calls == 4 and not err.value.retryable and guarded.exhausted
    assert (await guarded.ledger.spent()).tokens == 480 <= 600
    with pytest.raises(BudgetExhausted):  # exhausted stays exhausted
        await guarded.complete(judge_request("x"))
    assert inner.calls == 4 and guarded.blocked == 2


async def test_cost_budget_and_failed_calls_release_their_reservation():
    price = Price(1_000_000.0, 1_000_000.0, "spec")  # 1 USD a token, to make the arithmetic plain
    inner = CountingProvider(input_tokens=10, output_tokens=5, price=price)
    guarded = BudgetedProvider(inner, BudgetSpec(max_cost=60.0), MemoryLedger())
    small = judge_request("x" * 40, max_tokens=10)  # reserves 20 tokens = 20 USD; costs 15
    for _ in range(3):
        await guarded.complete(small)
    with pytest.raises(BudgetExhausted):
        await guarded.complete(small)  # 45 spent + 20 reserved > 60
    assert inner.calls == 3 and (await guarded.ledger.spent()).cost == pytest.approx(45.0)

    failing = BudgetedProvider(CountingProvider(fail=True), BudgetSpec(max_service_tokens=1000), MemoryLedger())
    with pytest.raises(ProviderError) as err:
        await failing.complete(judge_request())
    assert not isinstance(err.value, BudgetExhausted)
    assert (await failing.ledger.spent()).tokens == 0  # nothing reported, nothing kept


async def test_concurrent_calls_cannot_overshoot_together():
    inner = CountingProvider(input_tokens=100, output_tokens=100)
    guarded = BudgetedProvider(inner, BudgetSpec(max_service_tokens=1000), MemoryLedger())
    results = await asyncio.gather(*(guarded.complete(judge_request()) for _ in range(20)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == inner.calls == 5
    assert (await guarded.ledger.spent()).tokens == 1000


def test_no_limits_no_wrapper():
    inner = CountingProvider()
    assert with_budget(inner, BudgetSpec(), MemoryLedger()) is inner
    assert with_budget(inner, BudgetSpec(max_service_tokens=5), None) is inner
    assert isinstance(with_budget(inner, BudgetSpec(max_cost=1.0), MemoryLedger()), BudgetedProvider)


class Closing(CountingProvider):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


def _bus(key_value) -> SimpleNamespace:
    """Just what :func:`budgeted_provider` reads of a bus: the broker's KV access and the stream name."""
    return SimpleNamespace(broker=SimpleNamespace(key_value=key_value),
                           settings=SimpleNamespace(stream_name="LLAMADUO", nats_replicas=1))


async def test_budgeted_provider_opens_the_migration_ledger_only_with_limits():
    buckets: list[str] = []

    async def key_value(bucket: str, **config: object) -> object:
        buckets.append(bucket)
        return object()

    inner = CountingProvider()
    assert await budgeted_provider(_bus(key_value), "m-1", BudgetSpec(), inner) is inner and not buckets
    guarded = await budgeted_provider(_bus(key_value), "m-1", BudgetSpec(max_cost=1.0), inner)
    assert isinstance(guarded, BudgetedProvider) and guarded.inner is inner
    assert isinstance(guarded.ledger, KVLedger) and guarded.ledger.key == "m-1" and buckets == ["LLAMADUO_SPEND"]


async def test_budgeted_provider_closes_the_provider_when_the_ledger_cannot_be_opened():
    async def key_value(bucket: str, **config: object) -> object:
        raise ConnectionError("nats down")

    inner = Closing()
    with pytest.raises(ConnectionError):
        await budgeted_provider(_bus(key_value), "m-1", BudgetSpec(max_service_tokens=10), inner)
    assert inner.closed


# ------------------------------------------------------------------------------------------ judge, synthesizer


def _items(n: int) -> list[JudgeItem]:
    return [JudgeItem(item_id=f"i{i}", instruction=f"ticket {i} " + "x" * 200, reference="billing",
                      candidate="shipping") for i in range(n)]


async def test_judging_stops_at_the_budget_and_unjudged_answers_fail():
    inner = CountingProvider(input_tokens=150, output_tokens=30)
    # each judge call reserves its prompt estimate + 400 (the judge's max_tokens)
    guarded = BudgetedProvider(inner, BudgetSpec(max_service_tokens=2000), MemoryLedger())
    scores, usage = await judge_items(_items(12), guarded, JudgeSpec(max_attempts=3), cache=JudgeCache())
    judged = [s for s in scores if not s.failed]
    refused = [s for s in scores if s.failed]
    assert judged and refused and guarded.exhausted
    assert all("budget" in s.reason for s in refused)
    assert usage.calls == inner.calls == len(judged)  # refused calls are no calls and are not re-asked
    assert usage.tokens == (await guarded.ledger.spent()).tokens <= 2000


async def test_synthesis_stops_at_the_budget():
    rows = make_dataset(n_train=12, n_test=4, seed=1)
    train = [Example.model_validate(r) for r in rows if r["split"] == "train"]
    test = [Example.model_validate(r) for r in rows if r["split"] == "test"]
    inner = CountingProvider(input_tokens=200, output_tokens=200)
    guarded = BudgetedProvider(inner, BudgetSpec(max_service_tokens=1500), MemoryLedger())
    spec = SynthesisSpec(samples_per_round=64, seeds_per_call=2, examples_per_call=4)
    result = await synthesize(train, test, SynthRequest(samples=64), spec, guarded, round=1, seed=0,
                              system_prompt="")
    assert guarded.exhausted and 0 < inner.calls < 16 and result.kept < 64
    assert (await guarded.ledger.spent()).tokens == inner.calls * 400 <= 1500
    assert result.usage.tokens == inner.calls * 400


async def test_refused_synthesis_calls_are_no_calls():
    rows = make_dataset(n_train=12, n_test=4, seed=1)
    train = [Example.model_validate(r) for r in rows if r["split"] == "train"]
    inner = CountingProvider(input_tokens=200, output_tokens=200)
    guarded = BudgetedProvider(inner, BudgetSpec(max_service_tokens=1500), MemoryLedger())
    spec = SynthesisSpec(samples_per_round=64, seeds_per_call=2, examples_per_call=4)
    result = await synthesize(train, [], SynthRequest(samples=64), spec, guarded, round=1, seed=0, system_prompt="")
    assert guarded.blocked > 0 and result.usage.calls == inner.calls
    assert any(note.startswith("call failed: budget: ") for note in result.notes)


# ------------------------------------------------------------------------------------------ controller

SPEC = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"gate": "similarity_mean", "threshold": 90},
    "budget": {"max_rounds": 5, "max_service_tokens": 100_000},
}
DATA = domain.DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                       test=ArtifactRef(key="s", rows=4))


def _round(state, cause, round, sims, exhausted_batch=None):
    domain.on_train_done(state, cause.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key=f"a{round}"), rows=4), round=round))
    domain.on_infer_done(state, cause.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=len(sims), samples_per_prompt=1, batches=2), round=round))
    out = []
    half = len(sims) // 2
    for b in range(2):
        exhausted = b == exhausted_batch
        scores = [Score(item_id=f"i{b}{j}", similarity=s, precision=s) if not (exhausted and j) else
                  Score(item_id=f"i{b}{j}", failed=True, reason="budget: not made")
                  for j, s in enumerate(sims[b * half:(b + 1) * half])]
        out = domain.on_eval_scored(state, cause.follow(Subject.EVAL_SCORED, EvalScored(
            batch=b, batches=2, scores=scores, usage=Usage(calls=1, input_tokens=50),
            budget_exhausted=exhausted), round=round, key=f"b{b}"))
        if state.done or state.rounds[round].summary:
            break
    return out


def test_judging_out_of_budget_fails_the_migration_keeping_the_best_model():
    start = start_envelope("m-b", SPEC)
    state, _ = domain.start(start, parse_spec(SPEC), DATA)
    _round(state, start, 0, [60, 60, 60, 60])
    domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=4), generated=4, kept=4, usage=Usage(calls=2, input_tokens=10)),
        round=1))
    out = _round(state, start, 1, [20, 20, 20, 20], exhausted_batch=0)
    assert [o.type for o in out if o.type != Subject.MIGRATION_PROGRESS] == [Subject.MIGRATION_FAILED]
    failed = out[-1].payload
    assert isinstance(failed, MigrationFailed) and failed.reason == "budget" and "budget" in failed.detail
    assert failed.best_round == 0 and failed.best_model.key == "a0"
    assert [r.decision for r in failed.rounds] == ["continue", "stop"]
    assert state.rounds[1].judging_closed  # batch 1 is left: judges skip it
    assert failed.usage.input_tokens == 50 + 50 + 10 + 50


def test_synthesis_out_of_budget_fails_the_migration():
    start = start_envelope("m-s", SPEC)
    state, _ = domain.start(start, parse_spec(SPEC), DATA)
    _round(state, start, 0, [60, 60, 60, 60])
    out = domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=1), generated=1, kept=1, usage=Usage(calls=1, input_tokens=7),
        budget_exhausted=True), round=1))
    assert [o.type for o in out] == [Subject.MIGRATION_FAILED]
    failed = out[-1].payload
    assert failed.reason == "budget" and failed.best_model.key == "a0" and failed.usage.input_tokens == 107
    assert len(state.rounds) == 1  # no training on a cut-short synthetic set


# ------------------------------------------------------------------------------------------ shared ledger


async def test_kv_ledger_is_shared_and_never_overshoots(local_servers):
    import nats

    nc = await nats.connect(local_servers.nats_url)
    try:
        js = nc.jetstream()
        from nats.js.api import KeyValueConfig

        bucket = "T" + uuid.uuid4().hex[:8].upper() + "_SPEND"
        kv = await js.create_key_value(config=KeyValueConfig(bucket=bucket))
        a, b = KVLedger(kv, "m-1"), KVLedger(kv, "m-1")  # two workers, one migration
        budget = BudgetSpec(max_service_tokens=1000)
        granted = await asyncio.gather(*(ledger.reserve(90, 0.0, budget) for ledger in [a, b] * 10))
        assert sum(granted) == 11 and (await a.spent()) == Spend(990, 0.0)
        await b.adjust(-90, 0.0)
        assert await a.reserve(100, 0.0, budget) and not await b.reserve(1, 0.0, budget)
        assert (await KVLedger(kv, "m-2").spent()) == Spend()
    finally:
        await nc.close()


async def test_judge_service_reports_budget_exhausted(settings, monkeypatch):
    """The judge worker over real servers: its calls go through the KV ledger; the reply says so."""
    from support.bus import Recorder

    from llamaduo.bus.broker import Bus
    from llamaduo.services.judge import app as judge_app
    from llamaduo.storage.keys import spec_key
    from llamaduo.storage.store import ArtifactStore

    inner = CountingProvider(input_tokens=150, output_tokens=30)
    monkeypatch.setattr(judge_app, "make_provider", lambda spec, task: inner)
    store = ArtifactStore(settings)
    spec = parse_spec({**SPEC, "budget": {"max_service_tokens": 1500}})
    store.put_json(spec_key("m-kv"), spec.model_dump(mode="json"))
    start = start_envelope("m-kv", SPEC)
    async with Recorder(settings) as rec:
        judge = Bus(settings, "judge")
        judge_app.register(judge, store)
        await judge.broker.start()
        await judge.emit(start.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=0, batches=1, items=_items(8)),
                                      key="j0"))
        [scored] = await rec.wait_for(Subject.EVAL_SCORED, 0)
        await judge.broker.stop()
    p = scored.payload
    assert p.budget_exhausted and 0 < inner.calls < 8 and p.usage.calls == inner.calls
    assert sum(s.failed for s in p.scores) == 8 - inner.calls
