"""The shadow watch (issue 12 item 6): the rolling window without NATS; with a real nats-server, shadow.scored
below the threshold -> one route.degraded and one migration.start (traffic source, promotion policy), above it
-> nothing; and the gateway publishing shadow.request for a sampled answer, in shadow mode and when a promoted
version answers locally (canary, full)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.llm_servers import FakeOpenAIServer
from support.bus import Recorder, stored_events

from llamaduo.bus.broker import Bus
from llamaduo.cli.routes import change_route
from llamaduo.contracts.events import Subject, route_envelope
from llamaduo.contracts.gateway import ShadowScored
from llamaduo.contracts.routes import RouteState, promote
from llamaduo.contracts.spec import parse_spec
from llamaduo.errors import SpecError
from llamaduo.services.gateway.app import GatewayService, bind
from llamaduo.services.gateway.config import parse_routes
from llamaduo.services.gateway.watch import (
    ShadowWatch,
    ShadowWindow,
    add_score,
    load_templates,
    register_watch,
    remigration_id_of,
    remigration_spec,
    window_key,
)

UPSTREAM = '{"queue": "billing"}'
LOCAL = '{"queue": "shipping"}'


def scored(request_id: str, similarity: float | None, *, version: str = "m-v1", failed: bool = False) -> ShadowScored:
    return ShadowScored(route="invoice", request_id=request_id, version=version, similarity=similarity,
                        precision=similarity, failed=failed, reason="r")


def template_dict(tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "seed.jsonl"
    data.write_text('{"instruction": "q", "response": "a"}\n')
    return {"task": {"name": "invoice", "oracle": "llamaduo.tasks.triage:oracle"},
            "dataset": {"source": str(data), "test_fraction": 0.2, "holdout_fraction": 0},
            "student": {"base_model": "tiny:llama", "method": "full"},
            "judge": {"threshold": 90, "batch_size": 5}, "budget": {"max_rounds": 2}}


# ------------------------------------------------------------------------------------------ the window, no NATS


def test_window_fills_then_degrades_once_and_stays_bounded() -> None:
    window, verdicts = None, []
    for i, similarity in enumerate([90, 40, 40, 40]):
        window, verdict = add_score(window, scored(f"r{i}", similarity), size=3, threshold=50,
                                    remigration_id="m-next")
        verdicts.append(verdict)
    assert verdicts == ["counted", "counted", "counted", "degraded"]  # (90+40+40)/3 = 56.7 is not below 50
    assert [s.request_id for s in window.scores] == ["r1", "r2", "r3"] and window.judged == 4
    assert window.degraded and window.rolling_score == 40 and window.remigration_id == "m-next"
    window, verdict = add_score(window, scored("r4", 10), size=3, threshold=50)
    assert verdict == "counted" and window.remigration_id == "m-next"  # degraded once per version


def test_failed_and_repeated_scores_are_not_counted() -> None:
    window, _ = add_score(None, scored("a", 20), size=2, threshold=50)
    same, verdict = add_score(window, scored("a", 20), size=2, threshold=50)
    assert verdict == "duplicate" and same == window
    same, verdict = add_score(window, scored("b", None, failed=True), size=2, threshold=50)
    assert verdict == "ignored" and same.judged == 1
    full, verdict = add_score(window, scored("c", 30), size=2, threshold=50)
    assert verdict == "degraded" and full.rolling_score == 25 and full.remigration_id is None


def test_window_keys_and_remigration_ids() -> None:
    assert window_key("invoice", "m-v1") == "invoice/m-v1"
    odd = window_key("invoice", "v 1/ä")
    assert odd.startswith("invoice/h-") and odd != window_key("invoice", "v 1/ö")
    assert remigration_id_of("invoice", "m-v1") == remigration_id_of("invoice", "m-v1")
    assert remigration_id_of("invoice", "m-v1") != remigration_id_of("invoice", "m-v2")
    assert ShadowWindow(route="invoice", version="v").mean() is None


def test_remigration_spec_reads_traffic_and_promotes_in_the_current_mode(tmp_path: Path) -> None:
    template = parse_spec(template_dict(tmp_path))
    canary = promote(None, "m-v1", "canary", 25)
    spec = remigration_spec(template, "invoice", canary)
    assert spec.dataset.source == "traffic:invoice" and spec.dataset.test_fraction == 0.2
    assert spec.promotion is not None and spec.promotion.route == "invoice"
    assert (spec.promotion.mode, spec.promotion.canary_percent) == ("canary", 25)
    assert spec.promotion.only_if_better is True
    assert remigration_spec(template, "invoice", promote(None, "m-v1", "full")).promotion.mode == "full"
    assert remigration_spec(template, "invoice", None).promotion.mode == "shadow"


def test_a_wrong_template_fails_naming_its_file(tmp_path: Path) -> None:
    bad = tmp_path / "remigrate.yaml"
    bad.write_text(yaml.safe_dump({"task": {"name": "x"}}))
    config = parse_routes({"routes": [{"name": "invoice", "upstream": {"model": "m"},
                                       "shadow": {"remigrate": {"spec": str(bad)}}}]})
    with pytest.raises(SpecError, match=r"remigrate\.yaml"):
        load_templates(config)


# ------------------------------------------------------------------------------------------ with nats-server


def watch_config(tmp_path: Path, *, remigrate: bool = True) -> dict[str, Any]:
    shadow: dict[str, Any] = {"window": 3, "threshold": 60}
    if remigrate:
        path = tmp_path / "remigrate.yaml"
        path.write_text(yaml.safe_dump(template_dict(tmp_path)))
        shadow["remigrate"] = {"spec": str(path)}
    return {"routes": [{"name": "invoice", "upstream": {"model": "m"}, "shadow": shadow}]}


async def consumed(settings: Any, durable: str) -> None:
    """Wait until the durable consumer has nothing pending nor unacknowledged."""
    import nats

    from llamaduo.bus.topology import durable_name

    nc = await nats.connect(settings.nats_url)
    try:
        for _ in range(300):
            info = await nc.jetstream().consumer_info(settings.stream_name, durable_name(settings, durable))
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{durable} still has work: {info}")
    finally:
        await nc.close()


async def feed_scores(settings: Any, tmp_path: Path, similarities: list[float], *, replicas: int = 2,
                      remigrate: bool = True) -> list[Any]:
    """Gateway replicas' watches on one durable, the route in canary 30%, and ``similarities`` published as
    shadow.scored (the first one twice, as a redelivery would); returns the stream's events (a republished
    event id is stored once)."""
    from llamaduo.bus.topology import GATEWAY_WATCH

    await change_route(settings, "invoice", lambda s: promote(s, "m-v1", "canary", 30), reason="promote",
                       actor="test")
    config = parse_routes(watch_config(tmp_path, remigrate=remigrate))
    buses = [Bus(settings, "gateway") for _ in range(replicas)]
    for bus in buses:
        register_watch(bus, config)
        await bus.broker.start()
    try:
        envelopes = [route_envelope(Subject.SHADOW_SCORED, scored(f"r{i}", s), "invoice", key=f"s{i}")
                     for i, s in enumerate(similarities)]
        for env in [*envelopes, envelopes[0].model_copy(update={"event_id": "again"})]:
            await buses[0].emit(env)
        await consumed(settings, GATEWAY_WATCH)
    finally:
        for bus in buses:
            await bus.broker.stop()
    return await stored_events(settings)


def of(events: list[Any], subject: Subject) -> list[Any]:
    return [e for e in events if e.type == subject]


async def test_scores_below_the_threshold_degrade_once_and_start_a_remigration(settings, tmp_path) -> None:
    events = await feed_scores(settings, tmp_path, [70, 50, 40, 30, 20])
    [degraded] = of(events, Subject.ROUTE_DEGRADED)
    [start] = of(events, Subject.MIGRATION_START)
    assert degraded.route == "invoice" and degraded.migration_id == "m-v1"
    assert degraded.payload.version == "m-v1" and degraded.payload.window == 3
    assert degraded.payload.rolling_score < 60 == degraded.payload.threshold  # replicas take scores in any order
    assert degraded.payload.remigration_id == start.migration_id == remigration_id_of("invoice", "m-v1")
    spec = parse_spec(start.payload.spec)
    assert spec.dataset.source == "traffic:invoice" and spec.task.name == "invoice"
    assert spec.promotion.model_dump(include={"route", "mode", "canary_percent", "only_if_better"}) == {
        "route": "invoice", "mode": "canary", "canary_percent": 30, "only_if_better": True}


async def test_scores_above_the_threshold_change_nothing(settings, tmp_path) -> None:
    events = await feed_scores(settings, tmp_path, [70, 65, 90, 80])
    assert of(events, Subject.ROUTE_DEGRADED) == [] and of(events, Subject.MIGRATION_START) == []
    assert len(of(events, Subject.SHADOW_SCORED)) == 5


async def test_without_a_template_a_degradation_only_announces(settings, tmp_path) -> None:
    events = await feed_scores(settings, tmp_path, [10, 10, 10], replicas=1, remigrate=False)
    [degraded] = of(events, Subject.ROUTE_DEGRADED)
    assert degraded.payload.remigration_id is None and of(events, Subject.MIGRATION_START) == []


async def test_a_score_redelivered_after_a_failed_publish_still_announces(settings, tmp_path) -> None:
    """The window is written, then publishing fails (NATS away, process killed): the redelivered score finds its
    request counted and publishes again, under the same event ids."""
    import nats

    from llamaduo.bus.topology import routes_bucket, shadow_bucket

    config = parse_routes(watch_config(tmp_path))
    sent: list[Any] = []

    async def emit(env: Any) -> None:
        if not sent:
            sent.append(None)
            raise ConnectionError("NATS went away")
        sent.append(env)

    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        watch = ShadowWatch(config, emit=emit,
                            windows_kv=await js.create_key_value(bucket=shadow_bucket(settings.stream_name)),
                            routes_kv=await js.create_key_value(bucket=routes_bucket(settings.stream_name)))
        for i in range(2):
            await watch.on_scored(scored(f"r{i}", 10))
        with pytest.raises(ConnectionError):
            await watch.on_scored(scored("r2", 10))
        again = await watch.on_scored(scored("r2", 10))
    finally:
        await nc.close()
    assert again is not None and again.verdict == "duplicate" and again.window.judged == 3
    assert [e.type for e in sent[1:]] == [Subject.MIGRATION_START, Subject.ROUTE_DEGRADED]
    assert sent[1].migration_id == again.window.remigration_id


# ------------------------------------------------------------------------------------------ the gateway samples


def gateway_routes(upstream: FakeOpenAIServer, local: FakeOpenAIServer) -> dict[str, Any]:
    upstream_spec = {"provider": "openai-compatible", "model": "gpt-4o-mini", "base_url": upstream.base_url,
                     "api_key_env": "UPSTREAM_KEY_VAR", "max_retries": 0}
    return {"routes": [{"name": "invoice", "upstream": upstream_spec, "system_prompt": "Route the invoice.",
                        "redact": "emails_and_numbers", "local": {"base_url": local.base_url},
                        "shadow": {"sample_rate": 1.0}}]}


@pytest.mark.parametrize(("mode", "percent"), [("shadow", None), ("canary", 100), ("full", None)])
async def test_the_gateway_publishes_shadow_requests_for_sampled_answers(settings, store, monkeypatch, mode,
                                                                         percent) -> None:
    from openai import AsyncOpenAI

    monkeypatch.setenv("UPSTREAM_KEY_VAR", "sk-upstream-secret")
    with FakeOpenAIServer(responder=UPSTREAM) as upstream, FakeOpenAIServer(responder=LOCAL) as local:
        bus = Bus(settings, "gateway")
        service = GatewayService(bus, store, parse_routes(gateway_routes(upstream, local)), bind("127.0.0.1", 0))
        async with Recorder(settings) as recorder:
            await service.start()
            try:
                await change_route(settings, "invoice", lambda s: promote(s, "m-v1", mode, percent),
                                   reason="promote", actor="test")
                for _ in range(100):
                    state: RouteState | None = service.gateway.table.get("invoice")
                    if state is not None and state.mode == mode:
                        break
                    await asyncio.sleep(0.05)
                client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key="sk-client", max_retries=0)
                reply = await client.chat.completions.create(
                    model="invoice", messages=[{"role": "user", "content": "Invoice of bob@example.com"}])
                await client.close()
                [request] = await recorder.wait_for(Subject.SHADOW_REQUEST)
            finally:
                await service.stop()
                await bus.broker.stop()
        raw = b"".join(data for _, data in recorder.raw)
        upstream_url = upstream.base_url
    answered = UPSTREAM if mode == "shadow" else LOCAL
    assert reply.choices[0].message.content == answered  # the client's answer: one side's, undelayed
    payload = request.payload
    assert request.route == "invoice" and request.migration_id == "m-v1" and payload.request_id == reply.id
    assert (payload.reference, payload.candidate, payload.version) == (UPSTREAM, LOCAL, "m-v1")
    assert payload.instruction == "Invoice of [email]" and "bob@" not in payload.messages[-1].content
    assert payload.system_prompt == "Route the invoice."
    assert payload.judge.base_url == upstream_url and payload.judge.api_key_env == "UPSTREAM_KEY_VAR"
    assert b"sk-upstream-secret" not in raw and b"sk-client" not in raw
