import pytest
from pydantic import ValidationError

from llamaduo.contracts.events import (
    SCHEMA_VERSION,
    Envelope,
    Subject,
    TrainRequest,
    dead_letter_subject,
    parse_event,
    start_envelope,
    subject,
)


def test_envelope_roundtrip_keeps_typed_payload():
    start = start_envelope("m-abc", {"task": {"name": "x"}})
    req = start.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=7), key="train")
    parsed = parse_event(req.to_bytes())
    assert isinstance(parsed.payload, TrainRequest)
    assert parsed.payload.rows == 7
    assert parsed.causation_id == start.event_id
    assert parsed.correlation_id == start.event_id
    assert parsed.schema_version == SCHEMA_VERSION


def test_same_start_gets_same_event_id_and_follow_keys_are_deterministic():
    a, b = start_envelope("m-1", {}), start_envelope("m-1", {})
    assert a.event_id == b.event_id
    assert start_envelope("m-2", {}).event_id != a.event_id
    one = a.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=1), key="train")
    two = a.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=1), key="train")
    other = a.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[], rows=1), round=1, key="train")
    assert one.event_id == two.event_id != other.event_id


@pytest.mark.parametrize("bad", ["", "UPPER", "../etc", "a/b", "x" * 70, "-lead"])
def test_migration_id_rejects_unsafe_values(bad):
    with pytest.raises(ValidationError, match="migration_id"):
        start_envelope(bad, {})


def test_newer_schema_version_and_unknown_fields_are_refused():
    data = start_envelope("m-1", {}).model_dump(mode="json")
    with pytest.raises(ValidationError, match="newer"):
        parse_event({**data, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ValidationError, match="extra"):
        parse_event({**data, "surprise": 1})


def test_subjects_with_prefix_and_dead_letter():
    assert subject(Subject.EVAL_SCORED) == "eval.scored"
    assert subject(Subject.EVAL_SCORED, "acme") == "acme.eval.scored"
    assert dead_letter_subject("judge.request") == "dlq.judge.request"


def test_envelope_json_has_documented_fields():
    env = start_envelope("m-1", {"a": 1})
    assert set(Envelope.model_fields) == {
        "event_id", "migration_id", "round", "type", "schema_version", "occurred_at", "correlation_id",
        "causation_id", "payload", "route",
    }
    assert env.model_dump(mode="json")["type"] == "migration.start"
