"""The gateway's plain domain code, without NATS: routes file, routing decision, validators, redaction, capture."""

from __future__ import annotations

import json
import random

import pytest

from llamaduo.contracts.routes import RouteState, promote
from llamaduo.errors import SpecError
from llamaduo.services.gateway.capture import TrafficCapture
from llamaduo.services.gateway.checks import make_redactor, make_validator, redact_emails_and_numbers
from llamaduo.services.gateway.config import ValidatorConfig, parse_routes
from llamaduo.services.gateway.metrics import GatewayMetrics
from llamaduo.services.gateway.policy import decide, sticky_key

UPSTREAM = {"provider": "openai", "model": "gpt-4o-mini"}


def test_routes_file_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match=r"routes\.0\.name.*route name 'Bad/Name'"):
        parse_routes({"routes": [{"name": "Bad/Name", "upstream": UPSTREAM}]})
    with pytest.raises(SpecError, match="repeated: a"):
        parse_routes({"routes": [{"name": "a", "upstream": UPSTREAM}, {"name": "a", "upstream": UPSTREAM}]})
    with pytest.raises(SpecError, match="exactly one of json_schema or checker"):
        parse_routes({"routes": [{"name": "a", "upstream": UPSTREAM, "validator": {}}]})
    assert parse_routes({"routes": [{"name": "a", "upstream": UPSTREAM}]}).routes[0].capture is True


def test_sticky_key_prefers_user_then_headers_then_first_message() -> None:
    body = {"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "later"}]}
    assert sticky_key({**body, "user": "u1"}, {"x-conversation-id": "c1"}) == "user:u1"
    assert sticky_key(body, {"x-conversation-id": "c1", "x-user-id": "u2"}) == "x-conversation-id:c1"
    assert sticky_key(body, {}) == sticky_key({"messages": body["messages"][:1]}, {})


def test_decide_by_mode() -> None:
    canary = promote(None, "m-v1", "canary", 30)
    keys = [f"user:{i}" for i in range(1000)]
    local = sum(decide(canary, has_local=True, key=k, sample_rate=0).side == "local" for k in keys)
    assert 250 < local < 350
    assert all(decide(canary, has_local=False, key=k, sample_rate=0).side == "upstream" for k in keys[:50])
    assert decide(promote(None, "m-v1", "full"), has_local=True, key="k", sample_rate=0).side == "local"
    assert decide(RouteState(), has_local=True, key="k", sample_rate=1).side == "upstream"
    shadow = promote(None, "m-v1", "shadow")
    sampled = [decide(shadow, has_local=True, key="k", sample_rate=0.2, rng=random.Random(i)) for i in range(500)]
    assert all(d.side == "upstream" for d in sampled) and 60 < sum(d.shadow for d in sampled) < 140


def test_validators() -> None:
    schema = make_validator(ValidatorConfig(json_schema={"type": "object", "required": ["queue"]}), "r")
    assert schema is not None
    assert schema('```json\n{"queue": "billing"}\n```') is None
    assert "not JSON" in (schema("billing") or "")
    assert "'queue' is a required property" in (schema('{"other": 1}') or "")
    json_object = make_validator(ValidatorConfig(checker="json_object"), "r")
    assert json_object is not None and json_object("[1]") is not None and json_object("{}") is None
    with pytest.raises(SpecError, match="not a valid JSON Schema"):
        make_validator(ValidatorConfig(json_schema={"type": "nonsense"}), "routes[a].validator")


def test_untrusted_hooks_are_refused_before_import(marking_module) -> None:
    name, mark = marking_module
    with pytest.raises(SpecError, match="refused"):
        make_redactor(f"{name}:check", "routes[a]")
    with pytest.raises(SpecError, match="refused"):
        make_validator(ValidatorConfig(checker=f"{name}:check"), "routes[a].validator")
    assert not mark.exists()


def test_builtin_redaction_masks_emails_and_long_digit_runs() -> None:
    text = "Mail jane.doe+x@mail.example.org, card 4111 1111 1111 1111, phone 555-123-4567, order 42 of 2024"
    assert redact_emails_and_numbers(text) == ("Mail [email], card [number], phone [number], order 42 of 2024")


async def test_capture_batches_by_size_and_age_and_flushes_the_rest(store) -> None:
    now = [0.0]
    capture = TrafficCapture(store, batch_rows=3, batch_seconds=10, clock=lambda: now[0])
    keys = [capture.add("cap-invoice", {"request_id": f"r{i}"}) for i in range(4)]
    assert keys[0] == keys[1] == keys[2] != keys[3] and keys[0].startswith("traffic/cap-invoice/")
    assert await capture.flush_due() == 3  # the full batch
    now[0] = 5.0
    capture.add("cap-triage", {"request_id": "t0"})
    now[0] = 10.5
    assert await capture.flush_due() == 1  # invoice's second batch is 10.5 s old; triage's only 5.5 s
    assert capture.buffered == 1
    assert await capture.flush() == 1 and capture.buffered == 0
    # the bucket is shared by the session's tests: read this test's routes only
    written = sorted(store.list("traffic/cap-invoice/") + store.list("traffic/cap-triage/"))
    rows = [json.loads(line)["request_id"] for key in written for line in store.get_bytes(key).splitlines()]
    assert sorted(rows) == ["r0", "r1", "r2", "r3", "t0"]


def test_cost_saved_prices_local_tokens_at_the_upstream_price() -> None:
    metrics = GatewayMetrics()
    spec = parse_routes({"routes": [{"name": "a", "upstream": UPSTREAM}]}).routes[0].upstream
    metrics.answered("a", "local", 0.1, 1_000_000, 1_000_000, spec)
    metrics.answered("a", "upstream", 0.1, 1_000_000, 0, spec, upstream_cost=0.15)
    text = metrics.render().decode()
    assert 'llamaduo_gateway_cost_saved_usd_total{route="a"} 0.75' in text  # 0.15 + 0.60 per Mtok
    assert 'llamaduo_gateway_upstream_cost_usd_total{route="a"} 0.15' in text
