"""The gateway end to end: the official ``openai`` client against the gateway on a real uvicorn port, a real
nats-server and S3, the fake OpenAI server as the upstream service LLM and, as the local model, a real
``llamaduo serve`` app of a tiny model (or a small HTTP server that misbehaves on purpose)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fakes.llm_servers import FakeOpenAIServer
from openai import AsyncOpenAI
from support.bus import Recorder

from llamaduo.bus.broker import Bus
from llamaduo.cli.routes import change_route
from llamaduo.contracts.events import Subject
from llamaduo.contracts.routes import RouteState, promote, rollback
from llamaduo.services.gateway.app import GatewayService, bind
from llamaduo.services.gateway.config import parse_routes
from llamaduo.serving.server import ServerThread

UPSTREAM_ANSWER = '{"queue": "billing"}'
CLIENT_KEY = "sk-client-secret-never-stored"
SCHEMA = {"type": "object", "required": ["queue"], "properties": {"queue": {"type": "string"}}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=UPSTREAM_ANSWER) as server:
        yield server


def serve_local(tiny_model: Path) -> ServerThread:
    """A ``llamaduo serve`` app of the tiny model under the versions' names, on a free port."""
    from llamaduo.serving.app import create_app

    return ServerThread.start(create_app({"m-v1": tiny_model, "m-v2": tiny_model}))


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> Iterator[ServerThread]:
    running = serve_local(tiny_model)
    yield running
    running.stop()


class Misbehaving:
    """A local 'model server' that answers every request with HTTP ``status`` and ``content``, after ``delay``."""

    def __init__(self, status: int = 200, content: str = "not json at all", delay: float = 0.0) -> None:
        self.status, self.content, self.delay, self.calls = status, content, delay, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.calls += 1
                time.sleep(outer.delay)
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": outer.content},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def routes(upstream: FakeOpenAIServer, local_url: str, **extra: Any) -> dict[str, Any]:
    upstream_spec = {"provider": "openai-compatible", "model": "gpt-4o-mini", "base_url": upstream.base_url,
                     "max_retries": 0}
    invoice = {"name": "invoice", "upstream": upstream_spec, "redact": "emails_and_numbers",
               "local": {"base_url": local_url, "timeout_seconds": 20, "max_concurrency": 4}, **extra}
    triage = {"name": "triage", "upstream": upstream_spec, "capture": False}
    return {"routes": [invoice, triage], "capture": {"batch_rows": 100, "batch_seconds": 60}}


class Running:
    def __init__(self, service: GatewayService, bus: Bus, recorder: Recorder) -> None:
        self.service, self.bus, self.recorder = service, bus, recorder
        self.client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key=CLIENT_KEY, max_retries=0)

    async def ask(self, text: str, *, user: str | None = None, max_tokens: int = 6) -> Any:
        extra = {"user": user} if user else {}
        return await self.client.chat.completions.create(
            model="invoice", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, **extra)

    async def models(self) -> dict[str, dict[str, Any]]:
        async with httpx2.AsyncClient() as http:
            data = (await http.get(f"{self.service.url}/v1/models")).json()["data"]
        return {m["id"]: m for m in data}

    async def wait_mode(self, mode: str, version: str | None) -> dict[str, Any]:
        for _ in range(100):
            model = (await self.models())["invoice"]
            if model["mode"] == mode and model["version"] == version:
                return model
            await asyncio.sleep(0.05)
        raise AssertionError(f"the gateway never showed {mode} {version}: {await self.models()}")

    def answered_by(self) -> dict[str, str]:
        return {e.payload.request_id: e.payload.answered_by for e in self.recorder.of(Subject.TRAFFIC_LOGGED)}


async def start(settings: Any, store: Any, config: dict[str, Any]) -> AsyncIterator[Running]:
    bus = Bus(settings, "gateway")
    service = GatewayService(bus, store, parse_routes(config), bind("127.0.0.1", 0))
    async with Recorder(settings) as recorder:
        await service.start()
        running = Running(service, bus, recorder)
        try:
            yield running
        finally:
            await running.client.close()
            await service.stop()
            await bus.broker.stop()


async def set_route(settings: Any, change: Any, reason: str = "promote") -> RouteState:
    return (await change_route(settings, "invoice", change, reason=reason, actor="test"))[1]


async def test_routes_by_name_streams_and_captures_without_secrets(settings, store, upstream, local) -> None:
    async for gw in start(settings, store, routes(upstream, f"{local.url}/v1")):
        reply = await gw.ask("Invoice for jane.doe@example.com, account 1234 5678 9012")
        assert reply.choices[0].message.content == UPSTREAM_ANSWER and reply.model == "invoice"
        assert reply.usage.total_tokens > 0
        stream = await gw.client.chat.completions.create(
            model="triage", messages=[{"role": "user", "content": "my parcel"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == UPSTREAM_ANSWER
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await gw.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        models = await gw.models()
        assert set(models) == {"invoice", "triage"} and models["invoice"]["mode"] == "off"
        [logged] = await gw.recorder.wait_for(Subject.TRAFFIC_LOGGED)  # the triage route captures nothing
        async with httpx2.AsyncClient() as http:
            metrics = (await http.get(f"{gw.service.url}/metrics")).text
        bus_bytes = b"".join(raw for _, raw in gw.recorder.raw)
    assert logged.route == "invoice" and logged.payload.answered_by == "upstream"
    assert logged.payload.request_id == reply.id and logged.payload.stored_key.startswith("traffic/invoice/")
    assert "[email]" in logged.payload.messages[0].content and "[number]" in logged.payload.messages[0].content
    # written on shutdown; nothing for the triage route (the bucket is shared by the session's tests)
    assert logged.payload.stored_key in store.list("traffic/invoice/") and store.list("traffic/triage/") == []
    stored = store.get_bytes(logged.payload.stored_key)
    [row] = [json.loads(line) for line in stored.splitlines()]
    assert row["request_id"] == reply.id and row["answered_by"] == "upstream"
    assert row["messages"][0]["content"] == "Invoice for [email], account [number]"
    for captured in (stored, bus_bytes):
        assert CLIENT_KEY.encode() not in captured and b"jane.doe" not in captured
        assert b"uthorization" not in captured
    assert re.search(r'llamaduo_gateway_requests_total\{route="invoice",side="upstream"\} 1\.0', metrics)
    assert re.search(r'llamaduo_gateway_requests_total\{route="triage",side="upstream"\} 1\.0', metrics)


async def test_canary_is_sticky_full_is_local_and_rollback_restores(settings, store, upstream, local) -> None:
    async for gw in start(settings, store, routes(upstream, f"{local.url}/v1")):
        await set_route(settings, lambda s: promote(s, "m-v1", "canary", 50))
        assert (await gw.wait_mode("canary", "m-v1"))["percent"] == 50
        users = [f"user-{i}" for i in range(16)]
        first = {u: (await gw.ask("Invoice 7", user=u)).id for u in users}
        second = {u: (await gw.ask("Invoice 8", user=u)).id for u in users}
        await asyncio.sleep(0.5)
        sides = gw.answered_by()
        assert all(sides[first[u]] == sides[second[u]] for u in users)  # sticky per user
        assert {sides[first[u]] for u in users} == {"local", "upstream"}  # split

        await set_route(settings, lambda s: promote(s, "m-v2", "full"))
        await gw.wait_mode("full", "m-v2")
        full = [(await gw.ask("Invoice 9", user=u)).id for u in users[:4]]
        await asyncio.sleep(0.5)
        assert {gw.answered_by()[i] for i in full} == {"local"}
        versions = {e.payload.local_version for e in gw.recorder.of(Subject.TRAFFIC_LOGGED)
                    if e.payload.request_id in full}
        assert versions == {"m-v2"}

        await set_route(settings, lambda s: rollback(s), reason="rollback")
        back = await gw.wait_mode("canary", "m-v1")
        assert back["percent"] == 50
    changed = gw.recorder.of(Subject.ROUTE_CHANGED)
    assert [e.payload.reason for e in changed] == ["promote", "promote", "rollback"]
    assert changed[-1].payload.previous.version == "m-v2" and changed[-1].migration_id == "m-v1"


async def test_local_server_killed_mid_traffic_every_request_still_succeeds(settings, store, upstream,
                                                                             tiny_model) -> None:
    doomed = serve_local(tiny_model)
    config = routes(upstream, f"{doomed.url}/v1")
    config["routes"][0]["local"]["max_concurrency"] = 8  # the cap is not what this test is about
    async for gw in start(settings, store, config):
        await set_route(settings, lambda s: promote(s, "m-v1", "full"))
        await gw.wait_mode("full", "m-v1")
        before = [await gw.ask(f"Invoice {i}") for i in range(3)]
        await asyncio.to_thread(doomed.stop)
        after = await asyncio.gather(*(gw.ask(f"Invoice {i}") for i in range(6)))
        fallbacks = await gw.recorder.wait_for(Subject.ROUTE_FALLBACK, count=6)
        async with httpx2.AsyncClient() as http:
            metrics = (await http.get(f"{gw.service.url}/metrics")).text
        await asyncio.sleep(0.3)
        sides = gw.answered_by()
    assert all(isinstance(r.choices[0].message.content, str) for r in before)  # the tiny model's words
    assert all(r.choices[0].message.content == UPSTREAM_ANSWER for r in after)
    assert {sides[r.id] for r in before} == {"local"}
    assert {sides[r.id] for r in after} == {"upstream"}
    assert {e.payload.reason for e in fallbacks} == {"unavailable"}
    assert {e.payload.request_id for e in fallbacks} == {r.id for r in after}
    assert all(e.payload.version == "m-v1" and e.migration_id == "m-v1" for e in fallbacks)
    assert re.search(r'llamaduo_gateway_fallbacks_total\{reason="unavailable",route="invoice"\} 6\.0', metrics)
    saved = re.search(r'llamaduo_gateway_cost_saved_usd_total\{route="invoice"\} (\S+)', metrics)
    assert saved and float(saved.group(1)) > 0  # the local answers, at gpt-4o-mini's price


@pytest.mark.parametrize(("server", "reason"), [
    ({"content": "not json at all"}, "invalid"),
    ({"content": '{"other": 1}'}, "invalid"),
    ({"status": 503}, "overloaded"),
    ({"status": 500}, "error"),
    ({"delay": 2.0}, "timeout"),
])
async def test_a_local_answer_that_fails_falls_back_with_its_reason(settings, store, upstream, server,
                                                                    reason) -> None:
    bad = Misbehaving(**server)
    config = routes(upstream, bad.base_url, validator={"json_schema": SCHEMA})
    config["routes"][0]["local"]["timeout_seconds"] = 0.5
    try:
        async for gw in start(settings, store, config):
            await set_route(settings, lambda s: promote(s, "m-v1", "full"))
            await gw.wait_mode("full", "m-v1")
            reply = await gw.ask("Invoice 1")
            [fallback] = await gw.recorder.wait_for(Subject.ROUTE_FALLBACK)
    finally:
        bad.stop()
    assert reply.choices[0].message.content == UPSTREAM_ANSWER and bad.calls == 1
    assert fallback.payload.reason == reason and fallback.payload.request_id == reply.id


async def test_a_valid_local_answer_is_served_and_streamed_whole(settings, store, upstream) -> None:
    good = Misbehaving(content='{"queue": "shipping"}')
    calls_before = upstream.calls
    try:
        async for gw in start(settings, store, routes(upstream, good.base_url, validator={"json_schema": SCHEMA},
                                                      shadow={"sample_rate": 0})):  # no reference asked upstream
            await set_route(settings, lambda s: promote(s, "m-v1", "full"))
            await gw.wait_mode("full", "m-v1")
            stream = await gw.client.chat.completions.create(
                model="invoice", messages=[{"role": "user", "content": "Invoice 2"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        good.stop()
    assert text == '{"queue": "shipping"}' and upstream.calls == calls_before
