"""The programmatic judge: checker functions score answers without a service LLM.

For tasks that have a checker (``judge.method: programmatic``), :func:`check_items` scores the answers
with a built-in checker (``exact``, ``normalised``, ``json_fields``, see :data:`CHECKERS`) or the user's
function named by ``judge.checker`` (loaded by :func:`load_checker`). It gives the same similarity /
precision on the 1..100 scale as the LLM judge (:mod:`llamaduo.services.judge.domain`), with no calls,
tokens or cost.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from llamaduo.contracts.events import JudgeItem, Score, Usage
from llamaduo.data.scoring import field_shares, to_scale
from llamaduo.data.text import normalise_text, parse_json_object
from llamaduo.services.judge.domain import MAX_REASON_CHARS, Judgement, JudgementError, validate_judgement
from llamaduo.tasks.plugins import CheckerError, load_user_checker

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
        return Score(item_id=item.item_id, sample=item.sample, reason=reason[:MAX_REASON_CHARS], failed=True)
    except Exception as err:
        reason = f"checker {name} failed: {type(err).__name__}: {err}"
        return Score(item_id=item.item_id, sample=item.sample, reason=reason[:MAX_REASON_CHARS], failed=True)
    reason = judgement.reason or f"checker {name}"
    return Score(item_id=item.item_id, sample=item.sample, similarity=judgement.similarity,
                 precision=judgement.precision, reason=reason)


async def check_items(items: list[JudgeItem], checker: Checker, name: str = "checker") -> tuple[list[Score], Usage]:
    """Score every answer with ``checker`` (once: a checker is deterministic, so ``M`` does not apply) in a
    worker thread, and return ``(scores in item order, usage)``; the usage is zero. Never raises."""
    scores = await asyncio.to_thread(lambda: [check_answer(item, checker, name) for item in items])
    return scores, Usage()
