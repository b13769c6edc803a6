"""Reference-based scoring."""

from __future__ import annotations

import json

import pytest

from llamaduo.data.scoring import score_answer, to_scale, values_match
from llamaduo.data.text import parse_json_object

REF = json.dumps({"vendor": "Acme GmbH", "number": "A-1", "total": 12.5, "currency": "EUR"})


def test_scale_ends() -> None:
    assert to_scale(0) == 1 and to_scale(1) == 100 and to_scale(0.5) == pytest.approx(50.5)


def test_json_perfect_and_normalised() -> None:
    assert score_answer(REF, REF) == (100, 100)
    loose = json.dumps({"currency": "eur", "total": 12.504, "number": " A-1 ", "vendor": "ACME gmbh"})
    assert score_answer(REF, loose) == (100, 100)
    assert score_answer(REF, "```json\n" + REF + "\n```") == (100, 100)


def test_json_field_shares() -> None:
    one_wrong = json.dumps({"vendor": "Acme GmbH", "number": "A-2", "total": 12.5, "currency": "EUR"})
    assert score_answer(REF, one_wrong) == (pytest.approx(to_scale(3 / 4)), pytest.approx(to_scale(3 / 4)))
    missing = json.dumps({"vendor": "Acme GmbH", "total": 12.5})
    assert score_answer(REF, missing) == (pytest.approx(to_scale(2 / 4)), 100)
    extra = json.dumps({"vendor": "Acme GmbH", "number": "A-1", "total": 12.5, "currency": "EUR", "tax": 1})
    sim, prec = score_answer(REF, extra)
    assert sim == 100 and prec == pytest.approx(to_scale(4 / 5))


def test_json_ordering_and_garbage() -> None:
    perfect = score_answer(REF, REF)
    partly = score_answer(
        REF, json.dumps({"vendor": "Acme GmbH", "number": "B", "total": 99, "currency": "EUR"})
    )
    wrong = score_answer(REF, json.dumps({"vendor": "X", "number": "B", "total": 99, "currency": "USD"}))
    garbage = score_answer(REF, "the vendor is Acme")
    assert perfect > partly > wrong
    assert wrong == (1, 1) and garbage == (1, 1)
    assert score_answer(REF, "[1, 2]") == (1, 1)


def test_values_match_rules() -> None:
    assert values_match(10, 10.004) and not values_match(10, 10.01)
    assert values_match(10, "10.00") and not values_match(10, "ten")
    assert values_match(None, None) and not values_match(None, "null")
    assert not values_match(True, 1) and values_match([1, "a"], [1, "A"])
    assert values_match({"a": 1}, {"a": 1.0}) and not values_match({"a": 1}, {"a": 1, "b": 2})


def test_text_scoring() -> None:
    ref = "Reset your password from the login page."
    assert score_answer(ref, "  reset your PASSWORD from the login page. ") == (100, 100)
    close = score_answer(ref, "Reset your password from the settings page.")
    far = score_answer(ref, "Contact billing about your invoice.")
    verbose = score_answer(ref, ref + " Also clear your cookies, restart the browser and try again later.")
    assert close > far
    assert verbose[0] == 100 and verbose[1] < 70  # covers the reference, but imprecise
    assert score_answer(ref, "") == (1, 1)


def test_parse_json_object() -> None:
    assert parse_json_object('{"a": 1}') == {"a": 1}
    assert parse_json_object("[1]") is None and parse_json_object("nope") is None
