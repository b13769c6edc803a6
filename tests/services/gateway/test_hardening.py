"""The gateway behind the shared serving guard: a missing or wrong key is 401, an oversize body 413, overload 429
with ``Retry-After``; the client's key reaches neither the captured traffic, nor the bus, nor a log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from fakes.llm_servers import FakeOpenAIServer
from openai import AsyncOpenAI
from pydantic import SecretStr
from support.bus import Recorder

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject
from llamaduo.services.gateway.app import GatewayService, bind
from llamaduo.services.gateway.config import parse_routes

CLIENT_KEY = "sk-gateway-client-key-0123456789"
SLOW_SECONDS = 1.5


@pytest.fixture
def slow_upstream() -> Iterator[FakeOpenAIServer]:
    def answer(_: Any) -> str:
        time.sleep(SLOW_SECONDS)  # the fake server answers from a thread: this holds one request open
        return '{"queue": "billing"}'

    with FakeOpenAIServer(responder=answer) as server:
        yield server


def guarded(settings: Any) -> Any:
    return settings.model_copy(update={
        "api_keys": [SecretStr(CLIENT_KEY)], "serve_max_body_bytes": 4096,
        "gateway_max_concurrent": 1, "gateway_max_waiting": 0})


async def test_keys_body_limit_and_overload_are_enforced_and_the_key_is_never_kept(
        settings, store, slow_upstream, caplog) -> None:
    settings = guarded(settings)
    config = parse_routes({"routes": [{"name": "guarded", "upstream": {
        "provider": "openai-compatible", "model": "gpt-4o-mini", "base_url": slow_upstream.base_url,
        "max_retries": 0}}], "capture": {"batch_rows": 100, "batch_seconds": 60}})
    bus = Bus(settings, "gateway")
    service = GatewayService(bus, store, config, bind("127.0.0.1", 0))
    caplog.set_level(logging.DEBUG)
    messages = [{"role": "user", "content": "my parcel never came"}]
    async with Recorder(settings) as recorder:
        await service.start()
        try:
            for key in ("", "sk-wrong"):
                client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key=key or "unused", max_retries=0,
                                     default_headers={} if key else {"Authorization": ""})
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model="guarded", messages=messages)
                await client.close()
            async with httpx2.AsyncClient(base_url=service.url, timeout=30) as http:
                assert (await http.get("/health")).status_code == 200  # open without a key
                big = {"model": "guarded", "messages": [{"role": "user", "content": "x" * 8192}]}
                too_big = await http.post("/v1/chat/completions", json=big,
                                          headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                assert too_big.status_code == 413, too_big.text

                good = {"model": "guarded", "messages": messages}
                auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
                first = asyncio.ensure_future(http.post("/v1/chat/completions", json=good, headers=auth))
                await asyncio.sleep(0.5)  # the first holds the only slot; nothing may wait
                crowded = await http.post("/v1/chat/completions", json=good, headers=auth)
                assert crowded.status_code == 429 and int(crowded.headers["retry-after"]) >= 1, crowded.text
                answered = await first
                assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]
            [logged] = await recorder.wait_for(Subject.TRAFFIC_LOGGED)
            bus_bytes = b"".join(raw for _, raw in recorder.raw)
        finally:
            await service.stop()
            await bus.broker.stop()
    assert logged.route == "guarded"
    stored = b"".join(store.get_bytes(k) for k in store.list("traffic/guarded/"))
    assert stored and CLIENT_KEY.encode() not in stored and CLIENT_KEY.encode() not in bus_bytes
    assert all(CLIENT_KEY not in r.getMessage() and CLIENT_KEY not in str(r.__dict__) for r in caplog.records)
    assert all(CLIENT_KEY not in str(r.headers) for r in slow_upstream.requests)  # not forwarded upstream

