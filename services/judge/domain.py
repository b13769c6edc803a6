"""The judge: the service LLM grades the student's answers against the reference answers (LLM-as-judge).

Plain async code, no messaging: :func:`judge_items` takes answers and a provider and returns one
:class:`~llamaduo.contracts.events.Score` per answer plus the service-LLM usage. It never raises for a bad
answer or a failing provider; such answers come back as ``Score(failed=True, reason=...)``.

The rubric follows the LlamaDuo paper: given the instruction, the reference answer and the candidate,
rate *similarity* and *precision* from 1 to 100 and give a reason, as JSON (structured output schema).
Each answer is judged ``M = spec.judgements_per_answer`` times and averaged.

For tasks that have a checker (``judge.method: programmatic``), :func:`check_items` scores the answers
without a service LLM: a built-in checker (``exact``, ``normalised``, ``json_fields``, see
:data:`CHECKERS`) or the user's function named by ``judge.checker`` (loaded by :func:`load_checker`) gives
the same similarity / precision on the 1..100 scale, with no calls, tokens or cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError, field_validator

from llamaduo.contracts.events import JudgeItem, Score, Usage
from llamaduo.contracts.spec import JudgeSpec
from llamaduo.data.scoring import field_shares, to_scale
from llamaduo.data.text import normalise_text, parse_json_object, strip_code_fence
from llamaduo.providers.base import ChatMessage, Completion, CompletionRequest, Provider, ProviderError
from llamaduo.providers.budget import BudgetExhausted
from llamaduo.tasks.plugins import CheckerError, load_user_checker

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
_MAX_REASON_CHARS = 500
_MAX_TOKENS = 400


class JudgementError(ValueError):
    """A judge reply that is not a valid judgement."""


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
        return ("" if value is None else str(value)).strip()[:_MAX_REASON_CHARS]


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
    body = strip_code_fence(text)
    data: Any = None
    try:
        data = json.loads(body)
    except ValueError:
        start, end = body.find("{"), body.rfind("}")
        if start != -1 and end > start:
            try:
                data = json.loads(body[start : end + 1])
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


@dataclass
class _Tally:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cached: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, completion: Completion) -> None:
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens
        self.cost += completion.cost
        if completion.cached:
            self.cached += 1

    def usage(self, simulated: bool) -> Usage:
        return Usage(
            calls=self.calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.cost,
            cached=self.cached,
            simulated=simulated,
        )


async def _ask(
    provider: Provider, request: CompletionRequest, attempts: int, semaphore: asyncio.Semaphore, tally: _Tally
) -> Judgement | str:
    """One judgement with re-asks; returns the judgement or the reason it failed."""
    messages = list(request.messages)
    errors: list[str] = []
    for _ in range(attempts):
        try:
            async with semaphore:
                tally.calls += 1
                completion = await provider.complete(request.model_copy(update={"messages": messages}))
        except BudgetExhausted as err:  # the call was not made: it is no call, and asking again cannot help
            tally.calls -= 1
            errors.append(str(err))
            break
        except ProviderError as err:
            errors.append(f"provider error: {err}")
            if not err.retryable:
                break
            continue
        except Exception as err:  # a provider bug must not crash a whole round of judging
            errors.append(f"provider raised {type(err).__name__}: {err}")
            continue
        tally.add(completion)
        try:
            return parse_judgement(completion.text)
        except JudgementError as err:
            errors.append(f"invalid judgement: {err}")
            messages = [
                *request.messages,
                ChatMessage(role="assistant", content=completion.text[:2000]),
                ChatMessage(role="user", content=_REASK.format(error=err)),
            ]
    return f"judging failed after {len(errors)} attempt(s): " + " | ".join(errors[-3:])


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
    tally = _Tally()
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


# --------------------------------------------------------------------------------------------- programmatic

#: A checker: ``(instruction, reference, candidate) -> result``; see :func:`as_judgement` for the results.
Checker = Callable[[str, str, str], Any]


def check_exact(instruction: str, reference: str, candidate: str) -> dict[str, Any]:
    """100/100 when the candidate equals the reference (surrounding whitespace ignored), else 1/1."""
    same = candidate.strip() == reference.strip()
    return {"similarity": 100 if same else 1, "precision": 100 if same else 1,
            "reason": "exact match" if same else "not an exact match of the reference"}


def check_normalised(instruction: str, reference: str, candidate: str) -> dict[str, Any]:
    """100/100 when the texts are equal after :func:`~llamaduo.data.text.normalise_text`, else 1/1."""
    same = normalise_text(candidate) == normalise_text(reference)
    return {"similarity": 100 if same else 1, "precision": 100 if same else 1,
            "reason": "normalised match" if same else "differs from the reference after normalisation"}


def check_json_fields(instruction: str, reference: str, candidate: str) -> dict[str, Any]:
    """JSON objects field by field (:func:`~llamaduo.data.scoring.field_shares`): similarity is the share of the
    reference's fields the candidate got right, precision the share of the candidate's fields that are
    right. A candidate that is not a JSON object scores 1/1; a reference that is not one raises
    :class:`CheckerError` (the item cannot be checked this way)."""
    ref = parse_json_object(reference)
    if ref is None:
        raise CheckerError("the reference is not a JSON object")
    cand = parse_json_object(candidate)
    if cand is None:
        return {"similarity": 1, "precision": 1, "reason": "the candidate is not a JSON object"}
    recall, precision = field_shares(ref, cand)
    return {
        "similarity": to_scale(recall),
        "precision": to_scale(precision),
        "reason": f"{round(recall * len(ref))}/{len(ref)} reference fields right, "
        f"{round(precision * len(cand))}/{len(cand)} candidate fields right",
    }


#: The built-in checkers by their ``judge.checker`` name.
CHECKERS: dict[str, Checker] = {
    "exact": check_exact,
    "normalised": check_normalised,
    "json_fields": check_json_fields,
}


def load_checker(ref: str) -> Checker:
    """The checker named by ``judge.checker``: a built-in name or ``package.module:function``.

    A user function is loaded by :func:`~llamaduo.tasks.plugins.load_user_checker` (which raises
    :class:`~llamaduo.tasks.plugins.CheckerError` naming the spec field and what is wrong).
    """
    if ref in CHECKERS:
        return CHECKERS[ref]
    return load_user_checker(ref)


def as_judgement(result: Any) -> Judgement:
    """Turn a checker's result into a :class:`Judgement`; raise :class:`JudgementError` if it is none of:

    * a number (or bool) in 0..1: the share of the answer that is right, mapped to 1..100 for both scores;
    * a pair ``(similarity, precision)`` on the 1..100 scale;
    * a mapping with ``similarity`` and ``precision`` (1..100) and optionally ``reason``.
    """
    if isinstance(result, Judgement):
        return result
    if isinstance(result, dict):
        return validate_judgement(result)
    if isinstance(result, tuple | list) and len(result) == 2:
        return validate_judgement({"similarity": result[0], "precision": result[1]})
    if isinstance(result, bool | int | float):
        share = float(result)
        if not math.isfinite(share) or not 0 <= share <= 1:
            raise JudgementError(f"share {result!r} is outside 0..1")
        return Judgement(similarity=to_scale(share), precision=to_scale(share))
    raise JudgementError(
        f"a checker returned {type(result).__name__}: expected a share 0..1, a (similarity, precision) pair "
        "or a dict with 'similarity' and 'precision'"
    )


def check_answer(item: JudgeItem, checker: Checker, name: str = "checker") -> Score:
    """Score one answer with ``checker``; never raises (a raising checker or a bad result is a failed score)."""
    try:
        judgement = as_judgement(checker(item.instruction, item.reference, item.candidate))
    except JudgementError as err:
        reason = f"checker {name} returned an invalid result: {err}"
        return Score(item_id=item.item_id, sample=item.sample, reason=reason[:_MAX_REASON_CHARS], failed=True)
    except Exception as err:
        reason = f"checker {name} failed: {type(err).__name__}: {err}"
        return Score(item_id=item.item_id, sample=item.sample, reason=reason[:_MAX_REASON_CHARS], failed=True)
    reason = judgement.reason or f"checker {name}"
    return Score(item_id=item.item_id, sample=item.sample, similarity=judgement.similarity,
                 precision=judgement.precision, reason=reason)


async def check_items(items: list[JudgeItem], checker: Checker, name: str = "checker") -> tuple[list[Score], Usage]:
    """Score every answer with ``checker`` (once: a checker is deterministic, so ``M`` does not apply) in a
    worker thread, and return ``(scores in item order, usage)``; the usage is zero. Never raises."""
    scores = await asyncio.to_thread(lambda: [check_answer(item, checker, name) for item in items])
    return scores, Usage()
