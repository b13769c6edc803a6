"""JSON in LLM replies: one extraction, strict for scoring, searching for the judge and the synthesizer."""

from __future__ import annotations

import pytest

from llamaduo.data.text import extract_json, parse_json_object


def test_extract_json_reads_a_whole_or_fenced_reply() -> None:
    assert extract_json('{"a": 1}', search=False) == {"a": 1}
    assert extract_json('```json\n{"a": 1}\n```', search=False) == {"a": 1}
    assert extract_json("[1, 2]", search=True) == [1, 2]  # whole-text JSON is taken as it is


def test_extract_json_searches_only_when_asked() -> None:
    reply = 'Sure! {"a": 1} Hope that helps.'
    assert extract_json(reply, search=True) == {"a": 1}
    with pytest.raises(ValueError):
        extract_json(reply, search=False)
    for bad in ("no braces here", "} backwards {", 'almost {"a": } json'):
        with pytest.raises(ValueError):
            extract_json(bad, search=True)


def test_parse_json_object_never_searches() -> None:
    assert parse_json_object('```\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_object('The answer is {"a": 1}.') is None
