"""The OpenAI provider through the real ``openai`` client against a local fake Chat Completions server.

Shows: parsing, usage and cost; the request's shape (structured output, temperature, max_tokens, key);
429 + Retry-After; bounded 5xx retries with growing backoff; timeouts; json_schema -> json_object fallback;
no API key in errors or logs; the judge's re-asks, failure handling and cache over HTTP; RPM spacing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fakes.llm_servers import FakeOpenAIServer, RecordingSleep, Reply, oracle_judge

from llamaduo.contracts.events import JudgeItem
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, RateLimits, TaskSpec
from llamaduo.providers.base import ChatMessage, CompletionRequest, ProviderError, make_provider
from llamaduo.providers.limits import RetryPolicy
from llamaduo.providers.openai_provider import (
    REASONING_TOKEN_ALLOWANCE,
    OpenAIProvider,
    is_reasoning_model,
    strict_compatible,
)
from llamaduo.services.judge.domain import JUDGE_SCHEMA, JudgeCache, judge_items
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
KEY = "sk-test-VERY-SECRET-0123456789abcdef"
GOOD = json.dumps({"similarity": 90, "precision": 80, "reason": "close"})


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


Make = Callable[..., OpenAIProvider]


@pytest.fixture
async def make(server: FakeOpenAIServer, api_key: str) -> AsyncIterator[Make]:
    """Build providers against ``server`` with fast retries; closes them afterwards."""
    built: list[OpenAIProvider] = []

    def build(sleep: RecordingSleep | None = None, base_delay: float = 0.01, **spec_fields: object) -> OpenAIProvider:
        fields: dict[str, object] = {"provider": "openai", "model": "gpt-4o-mini", "base_url": server.base_url}
        fields.update(spec_fields)
        spec = ProviderSpec(**fields)  # type: ignore[arg-type]
        provider = OpenAIProvider(spec, TASK, policy=RetryPolicy.from_spec(spec, base_delay=base_delay), sleep=sleep)
        built.append(provider)
        return provider

    yield build
    for provider in built:
        await provider.aclose()


def _request(schema: bool = True) -> CompletionRequest:
    return CompletionRequest(
        purpose="judge",
        messages=[ChatMessage(role="system", content="be strict"), ChatMessage(role="user", content="rate it, JSON")],
        json_schema=JUDGE_SCHEMA if schema else None,
        temperature=0.2,
        max_tokens=123,
    )


def _items(n: int) -> list[JudgeItem]:
    rows = make_dataset(n_train=0, n_test=n, seed=5)
    return [
        JudgeItem(item_id=r["id"], instruction=r["instruction"], reference=r["response"], candidate=r["response"])
        for r in rows
    ]


# ------------------------------------------------------------------------------------------ happy path


async def test_good_answer_parses_with_usage_and_cost(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.ok(GOOD, prompt_tokens=1234, completion_tokens=56))
    completion = await make().complete(_request())
    assert completion.text == GOOD and json.loads(completion.text)["similarity"] == 90
    assert (completion.input_tokens, completion.output_tokens) == (1234, 56)
    # gpt-4o-mini list price: 0.15 / 0.60 USD per million tokens
    assert completion.cost == pytest.approx((1234 * 0.15 + 56 * 0.60) / 1e6)
    assert server.calls == 1


async def test_request_shape(server: FakeOpenAIServer, make: Make) -> None:
    await make().complete(_request())
    rec = server.requests[0]
    assert rec.path == "/v1/chat/completions" and rec.headers["authorization"] == f"Bearer {KEY}"
    body = rec.body
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.2 and body["max_completion_tokens"] == 123
    assert body["messages"] == [
        {"role": "system", "content": "be strict"},
        {"role": "user", "content": "rate it, JSON"},
    ]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == JUDGE_SCHEMA
    assert fmt["json_schema"]["strict"] is True and fmt["json_schema"]["name"] == "judge_reply"
    await make().complete(_request(schema=False))
    assert "response_format" not in server.requests[1].body


async def test_reasoning_and_compatible_parameters(server: FakeOpenAIServer, make: Make) -> None:
    await make(model="gpt-5-mini").complete(_request())
    body = server.requests[0].body
    assert "temperature" not in body and body["max_completion_tokens"] == 123 + REASONING_TOKEN_ALLOWANCE
    await make(provider="openai-compatible", model="llama-3.1-8b").complete(_request())
    body = server.requests[1].body
    assert body["temperature"] == 0.2 and body["max_tokens"] == 123 and "max_completion_tokens" not in body
    assert is_reasoning_model("o3-mini") and is_reasoning_model("gpt-5") and not is_reasoning_model("gpt-4o")


def test_strict_compatible() -> None:
    assert strict_compatible(JUDGE_SCHEMA)
    assert not strict_compatible({"type": "object", "properties": {"a": {"type": "string"}}, "required": []})
    nested = {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "object", "properties": {
        "y": {"type": "string"}}, "required": ["y"]}}}, "required": ["x"], "additionalProperties": False}
    assert not strict_compatible(nested)  # the inner object allows extra properties


async def test_missing_usage_is_estimated(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.ok(GOOD, include_usage=False))
    completion = await make().complete(_request())
    assert completion.input_tokens > 0 and completion.output_tokens == len(GOOD) // 4


# ------------------------------------------------------------------------------------------ failures


async def test_429_is_retried_after_retry_after(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.rate_limited(retry_after=1), Reply.ok(GOOD))
    completion = await make().complete(_request())
    assert completion.text == GOOD and server.calls == 2
    gap = server.requests[1].at - server.requests[0].at
    assert gap >= 1.0, f"retried after {gap:.3f} s, before the server's Retry-After of 1 s"


async def test_500_is_retried_with_backoff_and_bounded(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.error(500)
    sleep = RecordingSleep()
    provider = make(sleep=sleep, max_retries=3, base_delay=0.02)
    with pytest.raises(ProviderError) as info:
        await provider.complete(_request())
    assert server.calls == 3 + 1  # max_retries + 1
    assert len(sleep.delays) == 3
    for delay, base in zip(sleep.delays, [0.02, 0.04, 0.08], strict=True):
        assert base <= delay <= base * 1.5  # exponential with up to 50 % jitter
    message = str(info.value)
    assert info.value.retryable and "HTTP 500" in message and "gpt-4o-mini" in message and "openai" in message


async def test_500_then_success(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.error(502), Reply.error(503), Reply.ok(GOOD))
    assert (await make(max_retries=3).complete(_request())).text == GOOD
    assert server.calls == 3


async def test_hang_past_timeout_is_retried_then_fails_in_bounded_time(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.hang(30)
    start = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await make(timeout_seconds=0.3, max_retries=1).complete(_request())
    elapsed = time.monotonic() - start
    assert server.calls == 2 and 0.6 <= elapsed < 2.0
    assert info.value.retryable and "timed out" in str(info.value)


async def test_client_errors_are_not_retried(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.error(404, "model not found")
    with pytest.raises(ProviderError) as info:
        await make().complete(_request(schema=False))
    assert server.calls == 1 and not info.value.retryable and "HTTP 404" in str(info.value)


async def test_quota_exhausted_429_is_not_retried(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.error(429, "You exceeded your current quota", error_code="insufficient_quota")
    with pytest.raises(ProviderError) as info:
        await make().complete(_request())
    assert server.calls == 1 and not info.value.retryable


async def test_broken_http_body_is_retried(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.broken_body(), Reply.ok(GOOD))
    assert (await make().complete(_request())).text == GOOD and server.calls == 2


async def test_reply_without_choices_is_retried_and_refusal_is_not(server: FakeOpenAIServer, make: Make) -> None:
    empty = b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}'
    server.push(Reply(raw_body=empty), Reply.ok(GOOD))
    assert (await make().complete(_request())).text == GOOD and server.calls == 2
    refusal = json.dumps({"id": "y", "object": "chat.completion", "created": 0, "model": "m", "choices": [{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}]}).encode()
    server.push(Reply(raw_body=refusal))
    with pytest.raises(ProviderError) as info:
        await make().complete(_request())
    assert server.calls == 3 and not info.value.retryable and "refused" in str(info.value)


async def test_json_schema_rejected_falls_back_to_json_object(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.error(400, "response_format json_schema is not supported"), Reply.ok(GOOD), Reply.ok(GOOD))
    provider = make()
    assert (await provider.complete(_request())).text == GOOD
    assert (await provider.complete(_request())).text == GOOD
    formats = [r.body.get("response_format", {}).get("type") for r in server.requests]
    assert formats == ["json_schema", "json_object", "json_object"]  # the provider remembers


# ------------------------------------------------------------------------------------------ keys


async def test_api_key_never_in_errors_or_logs(
    server: FakeOpenAIServer, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.push(Reply.error(500, f"upstream saw key {KEY}"), Reply.error(401, f"Incorrect API key provided: {KEY}"))
    with pytest.raises(ProviderError) as info:
        await make(max_retries=2).complete(_request())
    assert server.calls == 2 and not info.value.retryable and "HTTP 401" in str(info.value)
    assert KEY not in str(info.value) and KEY not in repr(info.value.args)
    assert caplog.records and KEY not in caplog.text
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent, only never shown


def test_openai_needs_a_key_and_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="OPENAI_API_KEY"):
        OpenAIProvider(ProviderSpec(provider="openai", model="gpt-4o"), TASK)
    monkeypatch.setenv("MY_KEY", KEY)
    provider = make_provider(ProviderSpec(provider="openai", model="gpt-4o", api_key_env="MY_KEY"), TASK)
    assert isinstance(provider, OpenAIProvider) and provider.name == "openai:gpt-4o"


async def test_compatible_server_without_key_gets_a_placeholder(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    spec = ProviderSpec(provider="openai-compatible", model="qwen2.5-7b-instruct", base_url=server.base_url)
    provider = make_provider(spec, TASK)
    try:
        completion = await provider.complete(_request())
    finally:
        await provider.aclose()
    assert server.requests[0].headers["authorization"] == "Bearer not-needed"
    assert completion.cost == 0  # unknown model: no price


# ------------------------------------------------------------------------------------------ judge over HTTP


async def test_judge_garbled_then_valid_succeeds(server: FakeOpenAIServer, make: Make) -> None:
    server.push(Reply.ok("sure! similarity is high"), Reply.ok('{"similarity": 88, "precision": 77, "reason": "ok"}'))
    scores, usage = await judge_items(_items(1), make(), JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert not scores[0].failed and (scores[0].similarity, scores[0].precision) == (88, 77)
    assert server.calls == 2 and usage.calls == 2
    reask = server.requests[1].messages
    assert reask[-2] == {"role": "assistant", "content": "sure! similarity is high"}
    assert "could not be used" in reask[-1]["content"]
    assert usage.input_tokens == sum(r.usage[0] for r in server.requests if r.usage)


async def test_judge_always_garbled_gives_failed_score(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.ok('{"similarity": 8')  # truncated JSON, every time
    scores, usage = await judge_items(_items(1), make(), JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert scores[0].failed and scores[0].similarity is None
    assert "invalid judgement" in scores[0].reason and "3 attempt" in scores[0].reason
    assert server.calls == 3 and usage.calls == 3


async def test_judge_survives_a_failing_provider(server: FakeOpenAIServer, make: Make) -> None:
    server.responder = Reply.error(503)
    scores, _ = await judge_items(_items(2), make(max_retries=1), JudgeSpec(max_attempts=2), cache=JudgeCache())
    assert all(s.failed and "HTTP 503" in s.reason for s in scores)
    assert server.calls == 2 * 2 * 2  # items x judge attempts x (max_retries + 1)
    assert KEY not in " ".join(s.reason for s in scores)


async def test_judge_with_oracle_server_usage_adds_up_and_cache_saves_calls(
    server: FakeOpenAIServer, make: Make
) -> None:
    server.responder = oracle_judge(oracle)
    items = _items(4)
    items[1] = items[1].model_copy(update={"candidate": "no idea"})
    provider = make()
    cache = JudgeCache()
    scores, usage = await judge_items(items, provider, JudgeSpec(), cache=cache)
    assert [s.similarity for s in scores] == [100, 1, 100, 100]
    assert server.calls == 4 and usage.calls == 4
    served = [r.usage for r in server.requests if r.usage]
    assert usage.input_tokens == sum(p for p, _ in served) and usage.output_tokens == sum(c for _, c in served)
    assert usage.cost == pytest.approx(sum(p * 0.15 + c * 0.60 for p, c in served) / 1e6)
    assert not usage.simulated

    again, usage2 = await judge_items(items, provider, JudgeSpec(), cache=cache)
    assert server.calls == 4  # no second HTTP call for identical prompts
    assert usage2.calls == 0 and usage2.cached == 4 and [s.similarity for s in again] == [100, 1, 100, 100]


# ------------------------------------------------------------------------------------------ rate limit


async def test_rpm_limit_spaces_requests_at_the_server(server: FakeOpenAIServer, make: Make) -> None:
    provider = make(limits=RateLimits(requests_per_minute=600))  # one request every 0.1 s
    await asyncio.gather(*(provider.complete(_request()) for _ in range(5)))
    arrivals = sorted(r.at for r in server.requests)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert server.calls == 5 and min(gaps) >= 0.08 and arrivals[-1] - arrivals[0] >= 0.38
