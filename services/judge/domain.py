"""The judge: the service LLM grades the student's answers against the reference answers (LLM-as-judge).

Plain async code, no messaging: :func:`judge_items` takes answers and a provider and returns one
:class:`~llamaduo.contracts.events.Score` per answer plus the service-LLM usage. It never raises for a bad
answer or a failing provider; such answers come back as ``Score(failed=True, reason=...)``.

The rubric follows the LlamaDuo paper: given the instruction, the reference answer and the candidate,
rate *similarity* and *precision* from 1 to 100 and give a reason, as JSON (structured output schema).
Each answer is judged ``M = spec.judgements_per_answer`` times and averaged.

Tasks that have a checker (``judge.method: programmatic``) are scored without a service LLM by
:mod:`llamaduo.services.judge.checkers`, which shares :class:`Judgement` and its validation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ValidationError, field_validator

from llamaduo.contracts.events import JudgeItem, Score, Usage
from llamaduo.contracts.spec import JudgeSpec
from llamaduo.data.text import extract_json
from llamaduo.errors import LlamaDuoError
from llamaduo.providers.base import ChatMessage, CompletionRequest, Provider
from llamaduo.providers.reask import UsageTally, ask_until_valid

JUDGE_SYSTEM_PROMPT = (
    "You are a strict and fair evaluator. You compare an answer written by an AI assistant (the candidate) "
    "with a reference answer that is known to be correct, for the same instruction. You judge content, "
    "not style, and you reply with a single JSON object and nothing else."
)

_JUDGE_RUBRIC = """Evaluate the candidate answer against the reference answer for the instruction below.

Rate on a scale from 1 to 100:
- "similarity": how close the candidate is to the reference in content and meaning (100: the same \
information; 1: unrelated or empty).
- "precision": how accurate the candidate is: everything it states is correct and supported by the \
reference, with nothing wrong, invented or superfluous (100: fully precise; 1: wrong).
Give a one-sentence "reason" for the ratings.

Reply with only this JSON object: {"similarity": <integer 1-100>, "precision": <integer 1-100>, \
"reason": "<one sentence>"}"""

#: Structured-output schema of one judgement.
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": 1, "maximum": 100},
        "precision": {"type": "integer", "minimum": 1, "maximum": 100},
        "reason": {"type": "string"},
    },
    "required": ["similarity", "precision", "reason"],
    "additionalProperties": False,
}

_REASK = (
    "Your previous reply could not be used: {error}. Reply again with only the JSON object "
    '{{"similarity": <integer 1-100>, "precision": <integer 1-100>, "reason": "<one sentence>"}}.'
)
#: Longest reason kept in a judgement (and in a failed score's reason).
MAX_REASON_CHARS = 500
_MAX_TOKENS = 400


class JudgementError(LlamaDuoError, ValueError):
    """A judge reply (or a checker's result) that is not a valid judgement; a ``ValueError`` for callers
    that catch those. The judge re-asks or fails the score: it never ends a command."""


class Judgement(BaseModel):
    """One validated judgement. Scores are numbers in 0..100 (0 is clamped to 1); anything else fails."""

    similarity: float
    precision: float
    reason: str = ""

    @field_validator("similarity", "precision", mode="before")
    @classmethod
    def _score(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("must be a number from 1 to 100")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number from 1 to 100") from None
        if not math.isfinite(number) or not 0 <= number <= 100:
            raise ValueError(f"{value!r} is outside 1..100")
        return max(1.0, number)

    @field_validator("reason", mode="before")
    @classmethod
    def _reason(cls, value: Any) -> str:
        return ("" if value is None else str(value)).strip()[:MAX_REASON_CHARS]


def build_messages(item: JudgeItem) -> list[ChatMessage]:
    """The rubric prompt for one answer: system message plus a user message with the three texts."""
    user = (
        f"{_JUDGE_RUBRIC}\n\n### Instruction\n{item.instruction}\n\n### Reference answer\n{item.reference}"
        f"\n\n### Candidate answer\n{item.candidate}"
    )
    return [ChatMessage(role="system", content=JUDGE_SYSTEM_PROMPT), ChatMessage(role="user", content=user)]


def build_request(item: JudgeItem, temperature: float = 0.0) -> CompletionRequest:
    """The complete judge request for one answer (messages, schema and the structured context)."""
    return CompletionRequest(
        purpose="judge",
        messages=build_messages(item),
        json_schema=JUDGE_SCHEMA,
        temperature=temperature,
        max_tokens=_MAX_TOKENS,
        context={"instruction": item.instruction, "reference": item.reference, "candidate": item.candidate},
    )


def parse_judgement(text: str) -> Judgement:
    """Parse and validate a judge reply (a JSON object, possibly fenced or with text around it)."""
    try:
        data = extract_json(text, search=True)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise JudgementError(f"not a JSON object: {text[:80]!r}")
    return validate_judgement(data)


def validate_judgement(data: dict[str, Any]) -> Judgement:
    """A :class:`Judgement` from a mapping with ``similarity``, ``precision`` and optionally ``reason``;
    raise :class:`JudgementError` naming each bad field."""
    try:
        return Judgement.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise JudgementError(problems) from None


class JudgeCache:
    """In-memory LRU cache of valid judgements, keyed by everything that determines the reply."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, Judgement] = OrderedDict()

    def get(self, key: str) -> Judgement | None:
        """The cached judgement for ``key``, if any."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: Judgement) -> None:
        """Store a judgement, dropping the least recently used one when full."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget every judgement."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


#: The process-wide cache used when :func:`judge_items` gets none.
DEFAULT_CACHE = JudgeCache()


def cache_key(provider: Provider, request: CompletionRequest, draw: int = 0) -> str:
    """Key of a judge request: provider, model, endpoint, parameters and texts.

    At temperature 0 every draw of the same prompt is the same reply, so ``draw`` is ignored; above 0
    the M judgements of one answer are separate samples and keep separate entries.
    """
    payload = {
        "provider": provider.name,
        "kind": provider.spec.provider,
        "model": provider.spec.model,
        "base_url": provider.spec.base_url,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "schema": request.json_schema,
        "messages": [m.model_dump() for m in request.messages],
        "context": request.context,
        "draw": draw if request.temperature > 0 else 0,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


async def _ask(
    provider: Provider, request: CompletionRequest, attempts: int, semaphore: asyncio.Semaphore, tally: UsageTally
) -> Judgement | str:
    """One judgement with re-asks; returns the judgement or the reason it failed."""
    asked = await ask_until_valid(
        provider, request, parse_judgement, reask=lambda err: _REASK.format(error=err), attempts=attempts,
        semaphore=semaphore, tally=tally, invalid="invalid judgement",
    )
    if asked.value is not None:
        return asked.value
    return f"judging failed after {len(asked.errors)} attempt(s): " + " | ".join(asked.errors[-3:])


def _combine(item: JudgeItem, results: list[Judgement | str]) -> Score:
    good = [r for r in results if isinstance(r, Judgement)]
    if not good:
        reasons = [r for r in results if isinstance(r, str)]
        return Score(
            item_id=item.item_id, sample=item.sample, reason=reasons[0] if reasons else "", failed=True
        )
    similarity = sum(j.similarity for j in good) / len(good)
    precision = sum(j.precision for j in good) / len(good)
    reason = good[0].reason
    if len(results) > 1:
        reason = f"mean of {len(good)}/{len(results)} judgements; first: {reason}"
    return Score(
        item_id=item.item_id, sample=item.sample, similarity=similarity, precision=precision, reason=reason
    )


async def judge_items(
    items: list[JudgeItem],
    provider: Provider,
    spec: JudgeSpec,
    temperature: float = 0.0,
    *,
    cache: JudgeCache | None = None,
) -> tuple[list[Score], Usage]:
    """Judge every answer ``M`` times and return ``(scores in item order, usage)``; never raises.

    Calls run concurrently, at most ``provider.spec.limits.max_concurrency`` at a time. A reply that is
    not a valid judgement, or a retryable :class:`ProviderError`, is re-asked up to ``spec.max_attempts``
    times in all; a non-retryable error ends that judgement at once. An answer whose M judgements all
    failed is a failed score; otherwise the valid ones are averaged. Identical prompts (same provider,
    model, parameters and texts) are asked once: later ones come from ``cache`` and count as ``cached``.
    """
    cache = DEFAULT_CACHE if cache is None else cache
    semaphore = asyncio.Semaphore(provider.spec.limits.max_concurrency)
    tally = UsageTally()
    draws = spec.judgements_per_answer
    in_flight: dict[str, asyncio.Task[Judgement | str]] = {}

    async def one(item: JudgeItem, draw: int) -> Judgement | str:
        request = build_request(item, temperature)
        key = cache_key(provider, request, draw)
        cached = cache.get(key)
        if cached is not None:
            tally.cached += 1
            return cached
        if key in in_flight:  # the same prompt is being asked right now: wait for that reply
            result = await asyncio.shield(in_flight[key])
            if isinstance(result, Judgement):
                tally.cached += 1
            return result
        task = asyncio.ensure_future(_ask(provider, request, spec.max_attempts, semaphore, tally))
        in_flight[key] = task
        try:
            result = await task
        finally:
            in_flight.pop(key, None)
        if isinstance(result, Judgement):
            cache.put(key, result)
        return result

    results = await asyncio.gather(*(one(item, draw) for item in items for draw in range(draws)))
    scores = [_combine(item, list(results[i * draws : (i + 1) * draws])) for i, item in enumerate(items)]
    return scores, tally.usage(provider.simulated)
