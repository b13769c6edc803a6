"""The judge domain: rubric prompt, validation, re-asks, M-averaging, concurrency bound and cache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from llamaduo.contracts.events import JudgeItem
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, RateLimits, TaskSpec
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError, make_provider
from llamaduo.services.judge.domain import (
    JUDGE_SCHEMA,
    JudgeCache,
    JudgementError,
    build_request,
    judge_items,
    parse_judgement,
)
from llamaduo.tasks.invoice import make_dataset

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")


class Scripted(Provider):
    """A test double of a network LLM: replies come from ``reply(call_number, request)``."""

    name = "scripted"

    def __init__(self, reply: Callable[[int, CompletionRequest], str], concurrency: int = 8) -> None:
        super().__init__(ProviderSpec(model="fake", limits=RateLimits(max_concurrency=concurrency)), TASK)
        self.reply = reply
        self.requests: list[CompletionRequest] = []
        self.active = 0
        self.peak = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        number = len(self.requests)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.01)
            return Completion(text=self.reply(number, request), input_tokens=10, output_tokens=5, cost=0.001)
        finally:
            self.active -= 1


def _items(n: int = 6) -> list[JudgeItem]:
    rows = make_dataset(n_train=0, n_test=n, seed=3)
    return [
        JudgeItem(
            item_id=r["id"], instruction=r["instruction"], reference=r["response"], candidate=r["response"]
        )
        for r in rows
    ]


def _ok(sim: int = 80, prec: int = 70) -> str:
    return json.dumps({"similarity": sim, "precision": prec, "reason": "fine"})


def test_prompt_has_rubric_texts_and_schema() -> None:
    item = JudgeItem(item_id="a", instruction="INSTR", reference="REF", candidate="CAND")
    req = build_request(item, temperature=0.3)
    user = req.messages[-1].content
    assert req.messages[0].role == "system" and req.purpose == "judge"
    assert all(word in user for word in ("INSTR", "REF", "CAND", "similarity", "precision", "1 to 100"))
    assert req.json_schema == JUDGE_SCHEMA and req.temperature == 0.3
    assert req.context == {"instruction": "INSTR", "reference": "REF", "candidate": "CAND"}


def test_parse_judgement() -> None:
    assert parse_judgement(_ok(90, 80)).similarity == 90
    assert parse_judgement("```json\n" + _ok() + "\n```").precision == 70
    assert parse_judgement("Sure! " + _ok() + " Hope that helps.").similarity == 80
    assert parse_judgement('{"similarity": "55", "precision": 0, "reason": 3}').precision == 1
    for bad in (
        "nope",
        "[]",
        '{"similarity": 101, "precision": 5}',
        '{"similarity": 50}',
        '{"similarity": true, "precision": 5}',
        '{"similarity": NaN, "precision": 5}',
    ):
        with pytest.raises(JudgementError):
            parse_judgement(bad)


async def test_simulated_judge_scores_reference_100_and_wrong_lower() -> None:
    provider = make_provider(ProviderSpec(), TASK)
    items = _items(4)
    wrong = json.loads(items[1].reference) | {"vendor": "Nobody Ltd", "total": 0.5}
    items[1] = items[1].model_copy(update={"candidate": json.dumps(wrong)})
    items[2] = items[2].model_copy(update={"candidate": "no idea"})
    scores, usage = await judge_items(items, provider, JudgeSpec(), cache=JudgeCache())
    assert [s.item_id for s in scores] == [i.item_id for i in items]
    assert (scores[0].similarity, scores[0].precision) == (100, 100)
    assert scores[1].similarity is not None and 1 < scores[1].similarity < 100
    assert scores[2].similarity == 1 and not scores[2].failed
    assert usage.simulated and usage.calls == 4 and usage.cost == 0 and usage.tokens > 0


async def test_m_judgements_are_averaged() -> None:
    provider = Scripted(lambda n, _: _ok(60 if n % 2 else 80, 40 if n % 2 else 60))
    scores, usage = await judge_items(
        _items(1), provider, JudgeSpec(judgements_per_answer=2), temperature=0.7, cache=JudgeCache()
    )
    assert scores[0].similarity == pytest.approx(70) and scores[0].precision == pytest.approx(50)
    assert "mean of 2/2" in scores[0].reason and usage.calls == 2


async def test_m_judgements_at_temperature_zero_ask_once() -> None:
    provider = Scripted(lambda n, _: _ok())
    scores, usage = await judge_items(
        _items(2), provider, JudgeSpec(judgements_per_answer=3), cache=JudgeCache()
    )
    assert usage.calls == 2 and usage.cached == 4 and all(s.similarity == 80 for s in scores)


async def test_garbled_replies_are_reasked_then_succeed() -> None:
    replies = ["this is not json", '{"similarity": 500, "precision": 2, "reason": "x"}', _ok(77, 66)]
    provider = Scripted(lambda n, _: replies[n - 1])
    scores, usage = await judge_items(_items(1), provider, JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert not scores[0].failed and scores[0].similarity == 77
    assert usage.calls == 3 and usage.input_tokens == 30 and usage.cost == pytest.approx(0.003)
    reask = provider.requests[1].messages
    assert reask[-2].role == "assistant" and "could not be used" in reask[-1].content


async def test_always_failing_provider_gives_failed_scores() -> None:
    def broken(n: int, _: CompletionRequest) -> str:
        raise ProviderError("HTTP 503 from upstream", retryable=True)

    provider = Scripted(broken)
    scores, usage = await judge_items(_items(2), provider, JudgeSpec(max_attempts=3), cache=JudgeCache())
    assert all(s.failed and s.similarity is None for s in scores)
    assert "HTTP 503" in scores[0].reason and "3 attempt" in scores[0].reason
    assert usage.calls == 6 and usage.tokens == 0


async def test_non_retryable_error_and_bugs_never_raise() -> None:
    def denied(n: int, _: CompletionRequest) -> str:
        raise ProviderError("401 invalid API key", retryable=False)

    scores, usage = await judge_items(
        _items(1), Scripted(denied), JudgeSpec(max_attempts=3), cache=JudgeCache()
    )
    assert scores[0].failed and "401" in scores[0].reason and usage.calls == 1

    def buggy(n: int, _: CompletionRequest) -> str:
        raise KeyError("oops")

    scores, _ = await judge_items(_items(1), Scripted(buggy), JudgeSpec(max_attempts=2), cache=JudgeCache())
    assert scores[0].failed and "KeyError" in scores[0].reason

    always_bad = Scripted(lambda n, _: '{"similarity": "high"}')
    scores, _ = await judge_items(_items(1), always_bad, JudgeSpec(max_attempts=2), cache=JudgeCache())
    assert scores[0].failed and "invalid judgement" in scores[0].reason


async def test_concurrency_is_bounded() -> None:
    provider = Scripted(lambda n, _: _ok(), concurrency=3)
    items = [i.model_copy(update={"candidate": f"answer {k}"}) for k, i in enumerate(_items(12))]
    _, usage = await judge_items(items, provider, JudgeSpec(), cache=JudgeCache())
    assert usage.calls == 12 and 1 < provider.peak <= 3


async def test_cache_prevents_second_identical_call() -> None:
    provider = Scripted(lambda n, _: _ok())
    cache = JudgeCache()
    items = _items(3)
    _, first = await judge_items(items, provider, JudgeSpec(), cache=cache)
    scores, second = await judge_items(items, provider, JudgeSpec(), cache=cache)
    assert first.calls == 3 and first.cached == 0
    assert second.calls == 0 and second.cached == 3 and len(provider.requests) == 3
    assert all(s.similarity == 80 for s in scores)
    # identical answers inside one batch are asked once too; a different temperature is a new prompt
    twice = [items[0], items[0].model_copy(update={"sample": 1})]
    _, usage = await judge_items(twice, provider, JudgeSpec(), temperature=0.5, cache=cache)
    assert usage.calls == 1 and usage.cached == 1


async def test_failed_judgements_are_not_cached() -> None:
    calls = {"n": 0}

    def flaky(n: int, _: CompletionRequest) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProviderError("down", retryable=False)
        return _ok()

    provider = Scripted(flaky)
    cache = JudgeCache()
    first, _ = await judge_items(_items(1), provider, JudgeSpec(), cache=cache)
    second, usage = await judge_items(_items(1), provider, JudgeSpec(), cache=cache)
    assert first[0].failed and not second[0].failed and usage.calls == 1


def test_judgement_error_is_a_llamaduo_value_error() -> None:
    from llamaduo.errors import LlamaDuoError

    assert issubclass(JudgementError, LlamaDuoError) and issubclass(JudgementError, ValueError)
