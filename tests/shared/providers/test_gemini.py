"""The Gemini provider through the real ``google-genai`` client against a local fake Gemini API server.

Shows: parsing, usage (incl. thinking tokens) and cost; the request's shape (system instruction, roles,
JSON mode with response_json_schema, key header); 429 + Retry-After; bounded 5xx retries; timeouts; blocked
replies; no API key in errors or logs; the judge's re-asks, failure handling and cache over HTTP.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fakes.llm_servers import FakeGeminiServer, RecordingSleep, Reply, oracle_judge

from llamaduo.contracts.events import JudgeItem
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, TaskSpec
from llamaduo.providers.base import ChatMessage, CompletionRequest, ProviderError, make_provider
from llamaduo.providers.gemini_provider import GeminiProvider
from llamaduo.providers.limits import RetryPolicy
from llamaduo.services.judge.domain import JUDGE_SCHEMA, JudgeCache, judge_items
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
KEY = "AIzaFAKE-gemini-SECRET-0123456789abcdef"
GOOD = json.dumps({"similarity": 90, "precision": 80, "reason": "close"})


@pytest.fixture
def server() -> Iterator[FakeGeminiServer]:
    with FakeGeminiServer() as srv:
        yield srv


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    return KEY


Make = Callable[..., GeminiProvider]


@pytest.fixture
async def make(server: FakeGeminiServer, api_key: str) -> AsyncIterator[Make]:
    built: list[GeminiProvider] = []

    def build(sleep: RecordingSleep | None = None, base_delay: float = 0.01, **spec_fields: object) -> GeminiProvider:
        fields: dict[str, object] = {"provider": "gemini", "model": "gemini-2.5-flash", "base_url": server.base_url}
        fields.update(spec_fields)
        spec = ProviderSpec(**fields)  # type: ignore[arg-type]
        provider = GeminiProvider(spec, TASK, policy=RetryPolicy.from_spec(spec, base_delay=base_delay), sleep=sleep)
        built.append(provider)
        return provider

    yield build
    for provider in built:
        await provider.aclose()


def _request(schema: bool = True) -> CompletionRequest:
    return CompletionRequest(
        purpose="judge",
        messages=[
            ChatMessage(role="system", content="be strict"),
            ChatMessage(role="user", content="rate it"),
            ChatMessage(role="assistant", content="not json"),
            ChatMessage(role="user", content="again, JSON only"),
        ],
        json_schema=JUDGE_SCHEMA if schema else None,
        temperature=0.3,
        max_tokens=77,
    )


def _items(n: int) -> list[JudgeItem]:
    rows = make_dataset(n_train=0, n_test=n, seed=6)
    return [
        JudgeItem(item_id=r["id"], instruction=r["instruction"], reference=r["response"], candidate=r["response"])
        for r in rows
    ]


async def test_good_answer_parses_with_usage_and_cost(server: FakeGeminiServer, make: Make) -> None:
    server.push(Reply.ok(GOOD, prompt_tokens=2000, completion_tokens=40, thoughts_tokens=100))
    completion = await make().complete(_request())
    assert completion.text == GOOD
    # output = candidates + thinking tokens (billed as output); gemini-2.5-flash: 0.30 / 2.50 USD per 1M
    assert (completion.input_tokens, completion.output_tokens) == (2000, 140)
    assert completion.cost == pytest.approx((2000 * 0.30 + 140 * 2.50) / 1e6)
    assert server.calls == 1


async def test_request_shape(server: FakeGeminiServer, make: Make) -> None:
    await make().complete(_request())
    rec = server.requests[0]
    assert rec.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert rec.headers["x-goog-api-key"] == KEY and KEY not in rec.path
    body = rec.body
    assert body["systemInstruction"]["parts"] == [{"text": "be strict"}]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == JUDGE_SCHEMA
    assert config["temperature"] == 0.3 and config["maxOutputTokens"] == 77
    await make().complete(_request(schema=False))
    assert "responseMimeType" not in server.requests[1].body["generationConfig"]


async def test_missing_usage_is_estimated(server: FakeGeminiServer, make: Make) -> None:
    server.push(Reply.ok(GOOD, include_usage=False))
    completion = await make().complete(_request())
    assert completion.input_tokens > 0 and completion.output_tokens == len(GOOD) // 4


async def test_429_is_retried_after_retry_after(server: FakeGeminiServer, make: Make) -> None:
    server.push(Reply.rate_limited(retry_after=1), Reply.ok(GOOD))
    assert (await make().complete(_request())).text == GOOD
    assert server.calls == 2 and server.requests[1].at - server.requests[0].at >= 1.0


async def test_429_with_retry_info_in_the_body_is_honoured(server: FakeGeminiServer, make: Make) -> None:
    info = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}]
    server.push(Reply.rate_limited(retry_after=None, error_details=info), Reply.ok(GOOD))
    assert (await make().complete(_request())).text == GOOD
    assert server.calls == 2 and server.requests[1].at - server.requests[0].at >= 0.5


async def test_500_is_retried_with_backoff_and_bounded(server: FakeGeminiServer, make: Make) -> None:
    server.responder = Reply.error(500)
    sleep = RecordingSleep()
    with pytest.raises(ProviderError) as info:
        await make(sleep=sleep, max_retries=2, base_delay=0.02).complete(_request())
    assert server.calls == 2 + 1 and len(sleep.delays) == 2
    assert 0.02 <= sleep.delays[0] <= 0.03 and 0.04 <= sleep.delays[1] <= 0.06
    message = str(info.value)
    assert info.value.retryable and "HTTP 500" in message and "gemini-2.5-flash" in message


async def test_hang_past_timeout_is_retried_then_fails_in_bounded_time(server: FakeGeminiServer, make: Make) -> None:
    server.responder = Reply.hang(30)
    start = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await make(timeout_seconds=0.3, max_retries=1).complete(_request())
    assert server.calls == 2 and time.monotonic() - start < 2.0
    assert info.value.retryable and "timed out" in str(info.value)


async def test_bad_request_is_not_retried(server: FakeGeminiServer, make: Make) -> None:
    server.responder = Reply.error(400, "Invalid JSON payload")
    with pytest.raises(ProviderError) as info:
        await make().complete(_request())
    assert server.calls == 1 and not info.value.retryable and "HTTP 400" in str(info.value)


async def test_safety_block_is_not_retried_and_empty_reply_is(server: FakeGeminiServer, make: Make) -> None:
    server.push(Reply(content="", finish_reason="SAFETY"))
    with pytest.raises(ProviderError) as info:
        await make().complete(_request())
    assert server.calls == 1 and not info.value.retryable and "SAFETY" in str(info.value)
    server.push(Reply(content="", finish_reason="OTHER"), Reply.ok(GOOD))
    assert (await make().complete(_request())).text == GOOD and server.calls == 3


async def test_api_key_never_in_errors_or_logs(
    server: FakeGeminiServer, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.push(Reply.error(503, f"backend saw {KEY}"), Reply.error(403, f"API key {KEY} is not valid"))
    with pytest.raises(ProviderError) as info:
        await make(max_retries=2).complete(_request())
    assert server.calls == 2 and not info.value.retryable and "HTTP 403" in str(info.value)
    assert KEY not in str(info.value) and caplog.records and KEY not in caplog.text


def test_key_from_env_and_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MY_GEMINI"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ProviderError, match="GEMINI_API_KEY or GOOGLE_API_KEY") as info:
        make_provider(ProviderSpec(provider="gemini", model="gemini-2.0-flash"), TASK)
    assert not info.value.retryable
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    assert isinstance(make_provider(ProviderSpec(provider="gemini", model="gemini-2.0-flash"), TASK), GeminiProvider)
    with pytest.raises(ProviderError, match="MY_GEMINI"):
        make_provider(ProviderSpec(provider="gemini", model="gemini-2.0-flash", api_key_env="MY_GEMINI"), TASK)


async def test_judge_garbled_then_valid_and_always_garbled(server: FakeGeminiServer, make: Make) -> None:
    server.push(Reply.ok("{'similarity': 90"), Reply.ok(GOOD))
    scores, usage = await judge_items(_items(1), make(), JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert not scores[0].failed and scores[0].similarity == 90 and server.calls == 2
    reask = server.requests[1].messages
    assert reask[-2]["role"] == "assistant" and "could not be used" in reask[-1]["content"]

    server.responder = Reply.ok("I cannot rate this.")
    scores, usage = await judge_items(_items(2)[1:], make(), JudgeSpec(max_attempts=2), cache=JudgeCache())
    assert scores[0].failed and "invalid judgement" in scores[0].reason
    assert server.calls == 2 + 2 and usage.calls == 2


async def test_judge_with_oracle_usage_adds_up_and_cache_saves_calls(server: FakeGeminiServer, make: Make) -> None:
    server.responder = oracle_judge(oracle)
    items = _items(3)
    items[0] = items[0].model_copy(update={"candidate": "no idea"})
    provider = make()
    cache = JudgeCache()
    scores, usage = await judge_items(items, provider, JudgeSpec(), cache=cache)
    assert [s.similarity for s in scores] == [1, 100, 100] and server.calls == 3
    served = [r.usage for r in server.requests if r.usage]
    assert usage.input_tokens == sum(p for p, _ in served) and usage.output_tokens == sum(c for _, c in served)
    assert usage.cost == pytest.approx(sum(p * 0.30 + c * 2.50 for p, c in served) / 1e6)
    _, usage2 = await judge_items(items, provider, JudgeSpec(), cache=cache)
    assert server.calls == 3 and usage2.cached == 3 and usage2.calls == 0
