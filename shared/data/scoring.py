"""Reference-based scoring: the paper's two metrics (similarity, precision, each 1..100) without an LLM.

Used by the simulated judge when a task oracle has no ``score`` of its own, and by task oracles whose
answers are JSON objects (they score field by field).

* JSON objects are compared field by field: *similarity* is the share of the reference's fields the
  candidate got right, *precision* the share of the candidate's fields that are right (extra or wrong
  keys lower it). Strings compare trimmed and case-insensitive, numbers within 0.005.
* Other texts: a normalised exact match scores 100/100; otherwise token overlap: *similarity* is the
  share of the reference's tokens the candidate contains (recall), *precision* the share of the
  candidate's tokens found in the reference (their harmonic mean is the usual token F1).

Every share maps to ``1 + 99 * share``, so the scale is 1..100 like the LLM judge's.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from llamaduo.data.text import normalise_text, parse_json_object, tokenize

NUMBER_TOLERANCE = 0.005


def to_scale(share: float) -> float:
    """Map a share in 0..1 to the judge's 1..100 scale."""
    return 1.0 + 99.0 * min(1.0, max(0.0, share))


def as_number(value: Any) -> float | None:
    """A finite number from a JSON number or a numeric string; None for anything else (bools included)."""
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
        number = as_number(candidate)
        return number is not None and abs(number - float(reference)) <= NUMBER_TOLERANCE + 1e-9
    if isinstance(reference, str):
        if isinstance(candidate, str):
            return normalise_text(reference) == normalise_text(candidate)
        ref_number = as_number(reference)
        cand_number = as_number(candidate)
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
