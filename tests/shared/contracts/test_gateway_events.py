"""The gateway's events: envelopes that belong to a route, their payloads and their stream families."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from llamaduo.bus.topology import routes_bucket, stream_subjects
from llamaduo.contracts.events import (
    PAYLOADS,
    Envelope,
    RouteChanged,
    Subject,
    TrafficLogged,
    parse_event,
    route_envelope,
    start_envelope,
)
from llamaduo.contracts.routes import RouteState, promote
from llamaduo.settings import Settings


def _traffic(request_id: str = "r-1") -> TrafficLogged:
    return TrafficLogged(
        request_id=request_id, route="invoice", at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        messages=[{"role": "user", "content": "hi"}], response="hello", answered_by="upstream",
        latency_ms=12.5, prompt_tokens=3, completion_tokens=2, stored_key="traffic/invoice/2025-01-02/x.jsonl")


def test_every_subject_has_a_payload_and_a_stored_family():
    assert set(PAYLOADS) == set(Subject)
    settings = Settings()
    subjects = stream_subjects(settings)
    for family in ("traffic", "route", "shadow"):
        assert settings.subject(f"{family}.>") in subjects


def test_route_envelope_round_trips_and_correlates_by_route():
    env = route_envelope(Subject.TRAFFIC_LOGGED, _traffic(), "invoice", key="r-1")
    assert env.route == "invoice" and env.migration_id is None and env.correlation_id == "invoice"
    back = parse_event(env.to_bytes())
    assert isinstance(back.payload, TrafficLogged) and back.payload.response == "hello"
    # same key -> same event id: JetStream drops a re-published copy
    assert route_envelope(Subject.TRAFFIC_LOGGED, _traffic(), "invoice", key="r-1").event_id == env.event_id
    assert route_envelope(Subject.TRAFFIC_LOGGED, _traffic(), "invoice", key="r-2").event_id != env.event_id


def test_a_promotion_event_carries_route_and_migration():
    before = RouteState()
    state = promote(before, "m-abc", "canary", 10)
    change = RouteChanged(route="invoice", mode=state.mode, percent=state.percent, version=state.version,
                          local_model=state.local_model, previous=before, reason="promote", actor="controller")
    env = route_envelope(Subject.ROUTE_CHANGED, change, "invoice", migration_id="m-abc", key="m-abc")
    back = parse_event(env.model_dump(mode="json"))
    assert back.migration_id == "m-abc" and back.route == "invoice"
    assert back.payload.previous == before and back.payload.percent == 10


def test_an_envelope_needs_a_migration_or_a_route():
    data = start_envelope("m-1", {}).model_dump(mode="json")
    with pytest.raises(ValidationError, match=r"migration_id .* or a route"):
        parse_event({**data, "migration_id": None})
    assert parse_event({**data, "migration_id": None, "route": "invoice", "type": "traffic.logged",
                        "payload": _traffic().model_dump(mode="json")}).route == "invoice"


def test_a_migration_handler_gets_a_clear_error_for_a_route_event():
    env = route_envelope(Subject.TRAFFIC_LOGGED, _traffic(), "invoice")
    with pytest.raises(ValueError, match="no migration_id"):
        env.require_migration_id()
    assert start_envelope("m-1", {}).require_migration_id() == "m-1"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x..y", "a" * 65, "trailing-"])
def test_route_names_that_could_escape_a_prefix_are_refused(bad):
    with pytest.raises(ValidationError, match="route name"):
        route_envelope(Subject.TRAFFIC_LOGGED, _traffic(), bad)


def test_follow_keeps_the_route():
    env = route_envelope(Subject.SHADOW_REQUEST, _shadow(), "invoice")
    assert env.follow(Subject.SHADOW_SCORED, _scored()).route == "invoice"


def test_routes_bucket_is_scoped_to_the_stream():
    assert routes_bucket("LLAMADUO") == "LLAMADUO_ROUTES"
    assert Envelope.model_fields["route"].default is None


def _shadow():
    from llamaduo.contracts.gateway import ShadowRequest
    return ShadowRequest(request_id="r", route="invoice", version="m-1", instruction="q",
                         messages=[{"role": "user", "content": "q"}], reference="a", candidate="b")


def _scored():
    from llamaduo.contracts.gateway import ShadowScored
    return ShadowScored(request_id="r", route="invoice", version="m-1", similarity=80, precision=90)
