"""The programmatic judge: built-in checkers, user functions, refusals and failures, the spec fields."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from llamaduo.contracts.events import JudgeItem, Usage
from llamaduo.contracts.spec import JudgeSpec, SpecError, parse_spec
from llamaduo.services.judge.checkers import CHECKERS, check_items, load_checker
from llamaduo.tasks.plugins import CheckerError

HERE = __name__  # user checkers below are imported by this module's name


@pytest.fixture(autouse=True)
def allow_this_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows this module's checkers (user code loads only from what is installed or allowed)."""
    monkeypatch.setenv("LLAMADUO_ALLOWED_PLUGINS", f"{HERE},no_such_package_xyz")

# --------------------------------------------------------------------------------------------- user checkers


def share_checker(instruction: str, reference: str, candidate: str) -> float:
    """Right when the candidate starts with the reference's first word: a share."""
    return 1.0 if candidate.split()[:1] == reference.split()[:1] else 0.25


def pair_checker(instruction: str, reference: str, candidate: str) -> tuple[float, float]:
    return 80, 60


def dict_checker(instruction: str, reference: str, candidate: str) -> dict[str, Any]:
    return {"similarity": 70, "precision": 90, "reason": f"checked {instruction!r}"}


def raising_checker(instruction: str, reference: str, candidate: str) -> float:
    raise RuntimeError("checker exploded")


def out_of_range_checker(instruction: str, reference: str, candidate: str) -> float:
    return 1.5


def wrong_type_checker(instruction: str, reference: str, candidate: str) -> str:
    return "great"


def two_arguments(reference: str, candidate: str) -> float:
    return 1.0


NOT_A_FUNCTION = 42


# --------------------------------------------------------------------------------------------- helpers


def item(reference: str, candidate: str, item_id: str = "a") -> JudgeItem:
    return JudgeItem(item_id=item_id, instruction="extract", reference=reference, candidate=candidate)


async def check(name: str, *items: JudgeItem) -> list[Any]:
    scores, usage = await check_items(list(items), load_checker(name), name)
    assert usage == Usage()  # no calls, tokens or cost
    assert [s.item_id for s in scores] == [i.item_id for i in items]
    return scores


# --------------------------------------------------------------------------------------------- built-ins


async def test_exact() -> None:
    right, wrong, case = await check(
        "exact", item("Billing", " Billing\n", "1"), item("Billing", "shipping", "2"), item("Billing", "billing", "3")
    )
    assert (right.similarity, right.precision, right.failed) == (100, 100, False)
    assert (wrong.similarity, wrong.precision) == (1, 1) and "not an exact match" in wrong.reason
    assert case.similarity == 1  # exact is case-sensitive


async def test_normalised() -> None:
    right, wrong = await check("normalised", item("Billing  Queue", " billing queue\n"), item("billing", "shipping"))
    assert (right.similarity, right.precision) == (100, 100)
    assert (wrong.similarity, wrong.precision) == (1, 1)


async def test_json_fields() -> None:
    reference = json.dumps({"vendor": "ACME", "total": 12.5, "currency": "EUR", "date": "2024-01-02"})
    all_right = json.dumps({"vendor": "acme ", "total": "12.50", "currency": "EUR", "date": "2024-01-02"})
    three_of_four_plus_extra = json.dumps({"vendor": "ACME", "total": 12.5, "currency": "USD", "date": "2024-01-02",
                                           "note": "x"})
    scores = await check(
        "json_fields",
        item(reference, all_right, "1"),
        item(reference, f"```json\n{three_of_four_plus_extra}\n```", "2"),
        item(reference, "not json at all", "3"),
        item("plain text reference", all_right, "4"),
    )
    assert (scores[0].similarity, scores[0].precision) == (100, 100)
    assert scores[1].similarity == pytest.approx(1 + 99 * 3 / 4)  # 3 of the 4 reference fields
    assert scores[1].precision == pytest.approx(1 + 99 * 3 / 5)  # 3 of the 5 candidate fields
    assert "3/4 reference fields right, 3/5 candidate fields right" in scores[1].reason
    assert (scores[2].similarity, scores[2].precision, scores[2].failed) == (1, 1, False)
    assert "not a JSON object" in scores[2].reason
    assert scores[3].failed and scores[3].similarity is None
    assert "the reference is not a JSON object" in scores[3].reason


# --------------------------------------------------------------------------------------------- user functions


async def test_user_function_results() -> None:
    share = await check(f"{HERE}:share_checker", item("billing now", "billing", "1"), item("billing", "other", "2"))
    assert share[0].similarity == share[0].precision == 100
    assert share[1].similarity == share[1].precision == pytest.approx(1 + 99 * 0.25)
    assert "checker" in share[0].reason
    (pair,) = await check(f"{HERE}:pair_checker", item("a", "b"))
    assert (pair.similarity, pair.precision) == (80, 60)
    (mapping,) = await check(f"{HERE}:dict_checker", item("a", "b"))
    assert (mapping.similarity, mapping.precision, mapping.reason) == (70, 90, "checked 'extract'")


async def test_raising_or_invalid_checker_gives_failed_scores() -> None:
    (raised,) = await check(f"{HERE}:raising_checker", item("a", "b"))
    assert raised.failed and raised.similarity is None and raised.precision is None
    assert "RuntimeError: checker exploded" in raised.reason and "raising_checker" in raised.reason
    (out_of_range,) = await check(f"{HERE}:out_of_range_checker", item("a", "b"))
    assert out_of_range.failed and "outside 0..1" in out_of_range.reason
    (wrong_type,) = await check(f"{HERE}:wrong_type_checker", item("a", "b"))
    assert wrong_type.failed and "returned str" in wrong_type.reason


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_package_xyz.checks:score", "cannot import module 'no_such_package_xyz.checks'"),
        (f"{HERE}:missing", f"module '{HERE}' has no attribute 'missing'"),
        (f"{HERE}:NOT_A_FUNCTION", "is a int, not a function"),
        (f"{HERE}:two_arguments", "must accept (instruction, reference, candidate)"),
    ],
)
def test_bad_function_refused_naming_the_field(ref: str, message: str) -> None:
    with pytest.raises(CheckerError) as info:
        load_checker(ref)
    assert str(info.value).startswith(f"judge.checker {ref!r}: ")
    assert message in str(info.value)


def test_builtin_names_resolve_to_builtins() -> None:
    for name, function in CHECKERS.items():
        assert load_checker(name) is function
        assert JudgeSpec(method="programmatic", checker=name).checker == name


# --------------------------------------------------------------------------------------------- spec


def test_spec_fields() -> None:
    assert (JudgeSpec().method, JudgeSpec().checker) == ("llm", "json_fields")
    spec = JudgeSpec(method="programmatic", checker=f" {HERE}:share_checker ")
    assert spec.checker == f"{HERE}:share_checker"


@pytest.mark.parametrize("bad", ["fuzzy", "module.only", "a:b:c", ":score", "pkg.mod:", "pkg..mod:f", "pkg:no-dash"])
def test_spec_refuses_bad_checker(bad: str) -> None:
    base: dict[str, Any] = {
        "task": {"name": "t", "oracle": "llamaduo.tasks.invoice:oracle"},
        "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama"},
    }
    with pytest.raises(SpecError, match=r"judge\.checker: .*must be 'exact', 'normalised', 'json_fields'"):
        parse_spec({**base, "judge": {"method": "programmatic", "checker": bad}})
    with pytest.raises(SpecError, match=r"judge\.method"):
        parse_spec({**base, "judge": {"method": "regex"}})


# --------------------------------------------------------------------------------------------- judge service


def _spec(checker: str) -> dict[str, Any]:
    """A spec whose judge LLM could not even be built (no API key): programmatic judging must not build it."""
    return parse_spec({
        "task": {"name": "triage"},
        "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama", "method": "full"},
        "teacher": {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": "LLAMADUO_TEST_NO_SUCH_KEY"},
        "judge": {"method": "programmatic", "checker": checker},
    }).model_dump(mode="json")


async def _publish_batch(settings: Any, store: Any, checker: str) -> tuple[list[Any], list[str]]:
    from faststream.nats import TestNatsBroker

    from llamaduo.bus.broker import Bus
    from llamaduo.contracts.events import JudgeRequest, Subject, parse_event, start_envelope
    from llamaduo.services.judge.app import register
    from llamaduo.storage.keys import spec_key

    mid = "m-programmatic"
    store.put_json(spec_key(mid), _spec(checker))
    bus = Bus(settings, "judge")
    letters: list[str] = []

    async def dead_letter(subject: str, body: bytes, reason: str, deliveries: int) -> None:
        letters.append(reason)

    bus.dead_letter = dead_letter  # type: ignore[method-assign]
    register(bus, store)
    items = [item("billing", "billing", "a"), item("shipping", "Billing", "b")]
    req = start_envelope(mid, {}).follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=0, batches=1, items=items), key="j0")
    async with TestNatsBroker(bus.broker) as broker:
        await broker.publish(req.to_bytes(), settings.subject(Subject.JUDGE_REQUEST))
        mock = bus.publisher(Subject.EVAL_SCORED).mock
        scored = [parse_event(call.args[0]) for call in mock.call_args_list] if mock else []
    return scored, letters


async def test_judge_service_scores_without_a_provider(settings: Any, store: Any) -> None:
    assert "LLAMADUO_TEST_NO_SUCH_KEY" not in os.environ
    [scored], letters = await _publish_batch(settings, store, "exact")
    assert not letters
    assert [(s.item_id, s.similarity) for s in scored.payload.scores] == [("a", 100), ("b", 1)]
    assert scored.payload.usage == Usage() and scored.payload.provider == "programmatic:exact"
    assert not scored.payload.budget_exhausted


async def test_judge_service_dead_letters_a_bad_checker(settings: Any, store: Any) -> None:
    scored, letters = await _publish_batch(settings, store, "no_such_package_xyz:score")
    assert scored == []
    assert len(letters) == 1 and letters[0].startswith("permanent: judge.checker 'no_such_package_xyz:score'")
