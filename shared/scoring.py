"""Reference-based scoring: the paper's two metrics (similarity, precision, each 1..100) without an LLM.

Used by the simulated judge when a task oracle has no ``score`` of its own, and by task oracles whose
answers are JSON objects (they score field by field). Also the aggregates that the controller gates on.

* JSON objects are compared field by field: *similarity* is the share of the reference's fields the
  candidate got right, *precision* the share of the candidate's fields that are right (extra or wrong
  keys lower it). Strings compare trimmed and case-insensitive, numbers within 0.005.
* Other texts: a normalised exact match scores 100/100; otherwise token overlap: *similarity* is the
  share of the reference's tokens the candidate contains (recall), *precision* the share of the
  candidate's tokens found in the reference (their harmonic mean is the usual token F1).

Every share maps to ``1 + 99 * share``, so the scale is 1..100 like the LLM judge's.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

from llamaduo.contracts import Score

NUMBER_TOLERANCE = 0.005
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")


def to_scale(share: float) -> float:
    """Map a share in 0..1 to the judge's 1..100 scale."""
    return 1.0 + 99.0 * min(1.0, max(0.0, share))


def normalise_text(text: str) -> str:
    """Trim, lower-case (casefold) and collapse whitespace."""
    return _SPACE_RE.sub(" ", text.strip()).casefold()


def strip_code_fence(text: str) -> str:
    """Remove one surrounding Markdown code fence (```json ... ```), if present."""
    stripped = text.strip()
    match = _FENCE_RE.match(stripped)
    return match.group(1).strip() if match else stripped


def parse_json_object(text: str) -> dict[str, Any] | None:
    """Parse ``text`` (optionally inside a code fence) as a JSON object; ``None`` if it is not one."""
    try:
        value = json.loads(strip_code_fence(text))
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def values_match(reference: Any, candidate: Any) -> bool:
    """Normalised equality of two JSON values (see the module docstring)."""
    if reference is None or candidate is None:
        return reference is None and candidate is None
    if isinstance(reference, bool) or isinstance(candidate, bool):
        return reference is candidate
    if isinstance(reference, int | float):
        number = _as_number(candidate)
        return number is not None and abs(number - float(reference)) <= NUMBER_TOLERANCE + 1e-9
    if isinstance(reference, str):
        if isinstance(candidate, str):
            return normalise_text(reference) == normalise_text(candidate)
        ref_number = _as_number(reference)
        cand_number = _as_number(candidate)
        return (
            ref_number is not None
            and cand_number is not None
            and abs(ref_number - cand_number) <= (NUMBER_TOLERANCE + 1e-9)
        )
    if isinstance(reference, list):
        return (
            isinstance(candidate, list)
            and len(reference) == len(candidate)
            and all(values_match(r, c) for r, c in zip(reference, candidate, strict=True))
        )
    if isinstance(reference, dict):
        return (
            isinstance(candidate, dict)
            and set(reference) == set(candidate)
            and all(values_match(reference[k], candidate[k]) for k in reference)
        )
    return bool(reference == candidate)


def field_shares(reference: dict[str, Any], candidate: dict[str, Any]) -> tuple[float, float]:
    """Return ``(recall, precision)`` shares of two JSON objects, field by field."""
    correct = sum(
        1 for key, value in reference.items() if key in candidate and values_match(value, candidate[key])
    )
    if not reference or not candidate:  # an empty object is right only against an empty object
        same = not reference and not candidate
        return (1.0, 1.0) if same else (0.0, 0.0)
    recall = correct / len(reference)
    precision = correct / len(candidate)
    return recall, precision


def score_json(reference: dict[str, Any], candidate_text: str) -> tuple[float, float]:
    """Score a candidate text against a reference JSON object; not a JSON object -> ``(1, 1)``."""
    candidate = parse_json_object(candidate_text)
    if candidate is None:
        return 1.0, 1.0
    recall, precision = field_shares(reference, candidate)
    return to_scale(recall), to_scale(precision)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _TOKEN_RE.findall(text.casefold())


def score_text(reference: str, candidate: str) -> tuple[float, float]:
    """Exact match (normalised) -> 100/100, else token recall / token precision on the 1..100 scale."""
    if normalise_text(reference) == normalise_text(candidate):
        return 100.0, 100.0
    ref_tokens = Counter(tokenize(reference))
    cand_tokens = Counter(tokenize(candidate))
    if not ref_tokens or not cand_tokens:
        return 1.0, 1.0
    overlap = sum((ref_tokens & cand_tokens).values())
    recall = overlap / sum(ref_tokens.values())
    precision = overlap / sum(cand_tokens.values())
    return to_scale(recall), to_scale(precision)


def score_answer(reference: str, candidate: str) -> tuple[float, float]:
    """Score ``candidate`` against ``reference``: ``(similarity, precision)``, each in 1..100.

    A reference that is a JSON object is scored field by field; anything else by text overlap.
    """
    ref_object = parse_json_object(reference)
    if ref_object is not None:
        return score_json(ref_object, candidate)
    return score_text(reference, candidate)


def aggregate(scores: list[Score]) -> dict[str, float]:
    """Round aggregates over answers (one :class:`Score` per answer, M judgements already averaged).

    Means and coverages are over the answers that were judged (failed judgements are excluded and
    counted in ``failed``); coverages are percentages of judged answers with similarity >= 50 / >= 70.
    """
    judged = [s for s in scores if not s.failed and s.similarity is not None and s.precision is not None]
    failed = len(scores) - len(judged)
    if not judged:
        return {
            "similarity_mean": 0.0,
            "precision_mean": 0.0,
            "coverage_50": 0.0,
            "coverage_70": 0.0,
            "judged": 0.0,
            "failed": float(failed),
        }
    n = len(judged)
    similarities = [float(s.similarity) for s in judged if s.similarity is not None]
    precisions = [float(s.precision) for s in judged if s.precision is not None]
    return {
        "similarity_mean": sum(similarities) / n,
        "precision_mean": sum(precisions) / n,
        "coverage_50": 100.0 * sum(1 for v in similarities if v >= 50) / n,
        "coverage_70": 100.0 * sum(1 for v in similarities if v >= 70) / n,
        "judged": float(n),
        "failed": float(failed),
    }
