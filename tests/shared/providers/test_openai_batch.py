"""The OpenAI provider in Batch API mode (``batch_api: true``), through the real ``openai`` client against
the local fake server's Files and Batches endpoints.

Shows: concurrent judge calls go out as one batch (one JSONL upload, no Chat Completions call), each line
carrying the body a synchronous call would send; scores come back to the right items; tokens are the
server's usage and the cost half the synchronous price; files are deleted afterwards; a failed line fails
only its call and the judge re-asks it in a later batch; a missing line is a retryable error; an expired
batch delivers what ran and fails the rest with the reason; a failed batch and the batch timeout fail their
callers clearly; the synthesizer works unchanged; the spec refuses batch_api for other providers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fakes.llm_servers import BatchPlan, FakeOpenAIServer, Recorded, Reply, oracle_judge
from pydantic import ValidationError

from llamaduo.contracts.events import JudgeItem, SynthRequest
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, RateLimits, SynthesisSpec, TaskSpec
from llamaduo.data.examples import Example
from llamaduo.providers.base import CompletionRequest, ProviderError
from llamaduo.providers.limits import RetryPolicy
from llamaduo.providers.openai_provider import OpenAIProvider
from llamaduo.providers.pricing import BATCH_DISCOUNT, price_for
from llamaduo.services.judge.domain import JudgeCache, build_request, judge_items
from llamaduo.services.synthesizer.domain import synthesize
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
KEY = "sk-test-VERY-SECRET-0123456789abcdef"
N = 6


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=oracle_judge(oracle)) as srv:
        yield srv


Make = Callable[..., OpenAIProvider]


@pytest.fixture
async def make(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Make]:
    """Batch-mode providers against ``server`` with short window and polls; closed afterwards."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    built: list[OpenAIProvider] = []

    def build(**spec_fields: object) -> OpenAIProvider:
        fields: dict[str, object] = {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "base_url": server.base_url,
            "batch_api": True,
            "batch_window_seconds": 0.05,
            "batch_poll_seconds": 0.05,
            "limits": RateLimits(max_concurrency=64),  # the judge keeps this many calls open: one batch
        }
        fields.update(spec_fields)
        spec = ProviderSpec(**fields)  # type: ignore[arg-type]
        provider = OpenAIProvider(spec, TASK, policy=RetryPolicy.from_spec(spec, base_delay=0.01))
        built.append(provider)
        return provider

    yield build
    for provider in built:
        await provider.aclose()


def _items(n: int) -> list[JudgeItem]:
    rows = make_dataset(n_train=0, n_test=n, seed=5)
    return [
        JudgeItem(item_id=r["id"], instruction=r["instruction"], reference=r["response"], candidate=r["response"])
        for r in rows
    ]


def _paths(server: FakeOpenAIServer, method: str, pattern: str) -> list[str]:
    return [r.path for r in server.requests if r.method == method and re.fullmatch(pattern, r.path)]


def _lines(upload: dict[str, object]) -> list[dict[str, object]]:
    data = upload["data"]
    assert isinstance(data, bytes)
    return [json.loads(line) for line in data.decode().splitlines()]


def _candidate(rec: Recorded) -> str:
    return next(m["content"] for m in rec.messages if m["role"] == "user").rpartition("### Candidate answer\n")[2]


# ------------------------------------------------------------------------------------------ happy path


async def test_concurrent_judge_calls_go_out_as_one_batch(
    server: FakeOpenAIServer, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    items = _items(N)
    items[1] = items[1].model_copy(update={"candidate": "no idea"})
    provider = make()
    scores, usage = await judge_items(items, provider, JudgeSpec(), cache=JudgeCache())

    assert [s.similarity for s in scores] == [100, 1, 100, 100, 100, 100] and not any(s.failed for s in scores)
    assert not _paths(server, "POST", r".*/chat/completions")  # nothing went the synchronous way
    assert len(server.uploads) == 1 and server.uploads[0]["purpose"] == "batch"
    assert len(_paths(server, "POST", r"/v1/batches")) == 1 and _paths(server, "GET", r"/v1/batches/[^/]+")
    batch = next(iter(server.batches.values()))
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert batch["request_counts"] == {"total": N, "completed": N, "failed": 0}

    lines = _lines(server.uploads[0])
    assert len(lines) == N == len({line["custom_id"] for line in lines})
    assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines)
    assert [line["body"] for line in lines] == [provider.chat_body(build_request(item)) for item in items]

    served = [r.usage for r in server.batch_lines if r.usage]
    assert len(served) == N and usage.calls == N
    assert usage.input_tokens == sum(p for p, _ in served) and usage.output_tokens == sum(c for _, c in served)
    sync_cost = sum(p * 0.15 + c * 0.60 for p, c in served) / 1e6  # gpt-4o-mini list price
    assert usage.cost == pytest.approx(sync_cost / 2) and BATCH_DISCOUNT == 0.5

    assert server.files == {} and len(server.deleted_files) == 2  # input and output file, best effort
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "batch" in caplog.text and KEY not in caplog.text


async def test_batch_line_body_is_the_synchronous_body(server: FakeOpenAIServer, make: Make) -> None:
    request = build_request(_items(1)[0])
    batched = await make().complete(request)
    sync = await make(batch_api=False).complete(request)
    assert batched.text == sync.text
    (chat,) = [r for r in server.requests if r.path.endswith("/chat/completions")]
    assert _lines(server.uploads[0])[0]["body"] == chat.body
    assert batched.cost == pytest.approx(sync.cost * BATCH_DISCOUNT)


def test_batch_price_is_half_the_synchronous_price() -> None:
    spec = ProviderSpec(provider="openai", model="gpt-4o", price_input_per_mtok=4.0, price_output_per_mtok=8.0)
    assert price_for("gpt-4o", spec, batch=True).cost(10**6, 10**6) == pytest.approx(6.0)
    table = price_for("gpt-4o-mini", batch=True)
    assert (table.input_per_mtok, table.output_per_mtok) == (0.075, 0.30) and "Batch API" in table.note


# ------------------------------------------------------------------------------------------ failures


async def test_failed_line_fails_only_its_item_and_is_reasked_in_a_later_batch(
    server: FakeOpenAIServer, make: Make
) -> None:
    items = _items(N)
    items[2] = items[2].model_copy(update={"candidate": items[2].candidate + " "})  # fails once
    items[4] = items[4].model_copy(update={"candidate": "always overloaded"})  # fails every time
    judge = oracle_judge(oracle)
    failed_once: set[str] = set()

    def respond(rec: Recorded) -> Reply | str:
        candidate = _candidate(rec)
        if candidate == "always overloaded" or (candidate.endswith(" ") and candidate not in failed_once):
            failed_once.add(candidate)
            return Reply.error(500, "The server is overloaded")
        return judge(rec)

    server.responder = respond
    scores, usage = await judge_items(items, make(), JudgeSpec(max_attempts=3), cache=JudgeCache())

    assert [s.failed for s in scores] == [False, False, False, False, True, False]
    assert scores[2].similarity == 100  # re-asked in the next batch, then judged
    assert "HTTP 500" in scores[4].reason and "overloaded" in scores[4].reason and "3 attempt" in scores[4].reason
    assert [len(_lines(u)) for u in server.uploads] == [N, 2, 1]  # re-asks travel in later, smaller batches
    assert not _paths(server, "POST", r".*/chat/completions")
    assert usage.calls == N + 3
    served = [r.usage for r in server.batch_lines if r.usage]
    assert usage.input_tokens == sum(p for p, _ in served) and len(served) == N - 1
    assert server.files == {} and len(server.deleted_files) == 3 + 3 + 2  # inputs, outputs and error files
    assert KEY not in " ".join(s.reason for s in scores)


async def test_missing_line_is_a_retryable_error_for_that_call_only(server: FakeOpenAIServer, make: Make) -> None:
    server.plan_batches(BatchPlan(drop=1))
    provider = make()
    requests = [build_request(item) for item in _items(3)]
    results = await asyncio.gather(*(provider.complete(r) for r in requests), return_exceptions=True)
    assert [isinstance(r, ProviderError) for r in results] == [False, False, True]
    err = results[2]
    assert isinstance(err, ProviderError) and err.retryable and "without an answer" in str(err)
    assert len(server.uploads) == 1


async def test_expired_batch_delivers_what_ran_and_fails_the_rest_with_the_reason(
    server: FakeOpenAIServer, make: Make
) -> None:
    server.plan_batches(BatchPlan(status="expired", polls=2, done=1))
    scores, usage = await judge_items(_items(3), make(), JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert [s.failed for s in scores] == [False, True, True] and scores[0].similarity == 100
    for score in scores[1:]:
        assert "expired" in score.reason and "1 attempt" in score.reason  # not asked again
    assert len(server.uploads) == 1 and usage.calls == 3 and usage.input_tokens > 0


async def test_failed_batch_fails_every_caller_with_the_servers_reason(server: FakeOpenAIServer, make: Make) -> None:
    why = {"code": "model_not_found", "message": "model gpt-4o-mini is not available for batch", "line": 1}
    server.plan_batches(BatchPlan(status="failed", errors=[why]))
    provider = make()
    results = await asyncio.gather(
        *(provider.complete(build_request(item)) for item in _items(2)), return_exceptions=True
    )
    for err in results:
        assert isinstance(err, ProviderError) and not err.retryable
        assert "failed" in str(err) and "not available for batch" in str(err) and "line 1" in str(err)
    assert not server.batch_lines and server.files == {}


async def test_batch_past_its_timeout_is_cancelled_and_fails(server: FakeOpenAIServer, make: Make) -> None:
    server.plan_batches(BatchPlan(polls=10_000))
    provider = make(batch_timeout_seconds=0.3)
    with pytest.raises(ProviderError) as info:
        await provider.complete(build_request(_items(1)[0]))
    assert "did not finish within batch_timeout_seconds 0.3" in str(info.value) and not info.value.retryable
    assert _paths(server, "POST", r"/v1/batches/[^/]+/cancel")


async def test_rejected_json_schema_line_switches_to_json_mode(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.error(400, "response_format json_schema is not supported"))
    scores, _ = await judge_items(_items(1), make(), JudgeSpec(max_attempts=2), cache=JudgeCache())
    assert not scores[0].failed
    formats = [_lines(u)[0]["body"]["response_format"]["type"] for u in server.uploads]  # type: ignore[index]
    assert formats == ["json_schema", "json_object"]


async def test_close_fails_calls_still_gathering(server: FakeOpenAIServer, make: Make) -> None:
    provider = make(batch_window_seconds=30)
    call = asyncio.ensure_future(provider.complete(build_request(_items(1)[0])))
    await asyncio.sleep(0.05)
    await provider.aclose()
    with pytest.raises(ProviderError, match="closed"):
        await call
    assert not server.uploads


async def test_max_requests_sends_a_full_batch_at_once(server: FakeOpenAIServer, make: Make) -> None:
    provider = make(batch_max_requests=4, batch_window_seconds=30)  # only full batches go before 30 s
    scores, _ = await asyncio.wait_for(
        judge_items(_items(8), provider, JudgeSpec(), cache=JudgeCache()), timeout=10
    )
    assert not any(s.failed for s in scores) and [len(_lines(u)) for u in server.uploads] == [4, 4]


# ------------------------------------------------------------------------------------------ synthesizer


async def test_synthesizer_works_unchanged_through_batches(server: FakeOpenAIServer, make: Make) -> None:
    counter = itertools.count()

    def propose(rec: Recorded) -> str:
        n = int(re.search(r"Write (\d+) NEW examples", rec.last_user).group(1))  # type: ignore[union-attr]
        texts = oracle.propose([], n, 1000 + next(counter))
        return json.dumps({"examples": [{"instruction": t, "response": oracle.answer(t)} for t in texts]})

    server.responder = propose
    rows = make_dataset(seed=3)
    train = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in rows
             if r["split"] == "train"]
    test = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in rows
            if r["split"] == "test"]
    result = await synthesize(
        train, test, SynthRequest(samples=16), SynthesisSpec(examples_per_call=4), make(), round=1, seed=7,
        system_prompt="Extract invoice fields as JSON.",
    )
    assert result.kept >= 12 and result.failed_calls == 0
    assert all(ex.response == oracle.answer(ex.instruction) for ex in result.examples)
    assert not _paths(server, "POST", r".*/chat/completions")
    assert len(server.uploads[0]["data"].splitlines()) == result.calls >= 4  # type: ignore[union-attr]
    served = [r.usage for r in server.batch_lines if r.usage]
    assert result.usage.input_tokens == sum(p for p, _ in served)
    assert result.usage.cost == pytest.approx(sum(p * 0.15 + c * 0.60 for p, c in served) / 1e6 / 2)


# ------------------------------------------------------------------------------------------ spec


def test_spec_allows_batch_api_only_for_openai_providers() -> None:
    assert ProviderSpec(provider="openai", model="gpt-4o", batch_api=True).batch_api
    for provider in ("gemini", "simulated"):
        with pytest.raises(ValidationError, match="batch_api needs provider 'openai' or 'openai-compatible'"):
            ProviderSpec(provider=provider, model="m", batch_api=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ProviderSpec(provider="openai", model="gpt-4o", batch_api=True, batch_max_requests=60_000)


def test_request_with_no_messages_is_refused_before_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    provider = OpenAIProvider(ProviderSpec(provider="openai", model="gpt-4o", batch_api=True), TASK)
    with pytest.raises(ProviderError, match="no messages"):
        asyncio.run(provider.complete(CompletionRequest(purpose="chat", messages=[])))
