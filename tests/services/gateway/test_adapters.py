"""Adapter hand-off: a promoted version's adapter goes from S3 into a running ``llamaduo serve --adapters-dir``
without a restart. Real nats-server and S3, the fake OpenAI upstream, the tiny model served with admin keys, and
PEFT adapters of it made here (random LoRA weights); the official ``openai`` client asks the gateway."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fakes.llm_servers import FakeOpenAIServer
from openai import AsyncOpenAI
from support.bus import Recorder

from llamaduo.bus.broker import Bus
from llamaduo.cli.routes import change_route
from llamaduo.contracts.events import Subject
from llamaduo.contracts.routes import RouteState, promote, rollback
from llamaduo.errors import SpecError
from llamaduo.services.gateway.adapters import AdapterLoader, HandOffError, version_folder
from llamaduo.services.gateway.app import GatewayService, bind
from llamaduo.services.gateway.config import parse_routes
from llamaduo.serving.server import ServerThread

pytestmark = pytest.mark.slow

UPSTREAM_ANSWER = "from the service LLM"
KEY, ADMIN_KEY = "local-serve-key-123", "local-admin-key-456"
ROUTE = "adapted"


def make_adapter(base: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter of ``base`` with random (non-zero) weights saved in ``dest``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llamaduo.models.loading import load_causal_lm

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_causal_lm(base), config).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def made(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    return {v: make_adapter(tiny_model, root / v, seed) for v, seed in ((V1, 1), (V2, 2), (V3, 3))}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=UPSTREAM_ANSWER) as server:
        yield server


@pytest.fixture
def local(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[ServerThread, Path]]:
    """``llamaduo serve --adapters-dir`` of the tiny base, behind serving and admin keys."""
    from llamaduo.serving.app import create_app
    from llamaduo.serving.guard import ServingLimits

    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    app = create_app({"base": tiny_model}, limits=ServingLimits(api_keys=(KEY,), admin_api_keys=(ADMIN_KEY,)),
                     adapters_dir=adapters_dir)
    running = ServerThread.start(app)
    yield running, adapters_dir
    running.stop()


def config(upstream: FakeOpenAIServer, local_url: str, adapters_dir: Path) -> dict[str, Any]:
    return {"routes": [{
        "name": ROUTE,
        "upstream": {"provider": "openai-compatible", "model": "gpt-4o-mini", "base_url": upstream.base_url,
                     "max_retries": 0},
        "local": {"base_url": f"{local_url}/v1", "api_key_env": "TEST_LOCAL_KEY", "load_adapters": True,
                  "admin_api_key_env": "TEST_LOCAL_ADMIN_KEY", "adapters_dir": str(adapters_dir)},
    }]}


#: Versions (migration ids) of this module's run: the S3 bucket is shared by the session's tests.
RUN = uuid.uuid4().hex[:6]
V1, V2, V3 = (f"ad{RUN}-v{i}" for i in (1, 2, 3))


def adapter_key(version: str) -> str:
    return f"migrations/{version}/round-0/adapter"


async def served(local: ServerThread) -> list[str]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        return [m["id"] for m in (await http.get(f"{local.url}/v1/models")).json()["data"]]


class Gw:
    def __init__(self, service: GatewayService, recorder: Recorder) -> None:
        self.service, self.recorder = service, recorder
        self.client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key="sk-client", max_retries=0)

    async def ask(self) -> tuple[str, str, str | None]:
        """(answered_by, text, local_version) of one request, from its traffic.logged event."""
        reply = await self.client.chat.completions.create(
            model=ROUTE, messages=[{"role": "user", "content": "Invoice 42"}], max_tokens=4)
        for _ in range(200):
            logged = [e for e in self.recorder.of(Subject.TRAFFIC_LOGGED) if e.payload.request_id == reply.id]
            if logged:
                return logged[0].payload.answered_by, reply.choices[0].message.content or "", \
                    logged[0].payload.local_version
            await asyncio.sleep(0.05)
        raise AssertionError("no traffic.logged for the request")

    async def until_local(self, version: str, seconds: float = 60.0) -> None:
        for _ in range(int(seconds / 0.2)):
            if (await self.ask())[0] == "local":
                assert (await self.ask())[2] == version
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"version {version} never answered locally")


async def gateway(settings: Any, store: Any, cfg: dict[str, Any]) -> AsyncIterator[Gw]:
    bus = Bus(settings, "gateway")
    service = GatewayService(bus, store, parse_routes(cfg), bind("127.0.0.1", 0))
    assert service.gateway.adapters is not None
    service.gateway.adapters.retry_seconds = 0.3
    async with Recorder(settings) as recorder:
        await service.start()
        gw = Gw(service, recorder)
        try:
            yield gw
        finally:
            await gw.client.close()
            await service.stop()
            await bus.broker.stop()
            store.delete(store.list(f"traffic/{ROUTE}/"))  # other tests list the session bucket's traffic


async def set_route(settings: Any, change: Any, reason: str = "promote") -> RouteState:
    return (await change_route(settings, ROUTE, change, reason=reason, actor="test"))[1]


async def test_promoted_adapter_is_loaded_without_restart_and_rollback_keeps_it(
        settings, store, upstream, local, made, monkeypatch) -> None:
    server, adapters_dir = local
    monkeypatch.setenv("TEST_LOCAL_KEY", KEY)
    monkeypatch.setenv("TEST_LOCAL_ADMIN_KEY", ADMIN_KEY)
    async for gw in gateway(settings, store, config(upstream, server.url, adapters_dir)):
        loader = gw.service.gateway.adapters
        # promoted before its adapter is in S3: the hand-off fails and is retried; requests fall back meanwhile
        await set_route(settings, lambda s: promote(s, V1, "full", local_model=f"invoice-{V1}",
                                                    adapter_key=adapter_key(V1)))
        assert await gw.ask() == ("upstream", UPSTREAM_ANSWER, None)
        [fallback, *_] = await gw.recorder.wait_for(Subject.ROUTE_FALLBACK)
        assert fallback.payload.reason == "unavailable" and "not loaded" in fallback.payload.detail
        await asyncio.to_thread(store.put_dir, adapter_key(V1), made[V1])
        await gw.until_local(V1)  # retried, downloaded, loaded: no restart of either server
        assert (adapters_dir / V1 / "adapter_config.json").is_file()
        assert await served(server) == ["base", f"invoice-{V1}"]

        await asyncio.to_thread(store.put_dir, adapter_key(V2), made[V2])
        await set_route(settings, lambda s: promote(s, V2, "canary", 100, local_model=f"invoice-{V2}",
                                                    adapter_key=adapter_key(V2)))
        await gw.until_local(V2)
        assert loader.loads == 2

        await set_route(settings, rollback, reason="rollback")  # the previous name is still served: no load
        await gw.until_local(V1, seconds=5)
        assert loader.loads == 2 and await served(server) == ["base", f"invoice-{V1}", f"invoice-{V2}"]

        # every replica may try: two loaders handing off one new version at once both succeed, one load wins
        await asyncio.to_thread(store.put_dir, adapter_key(V3), made[V3])
        state = promote(None, V3, "full", local_model=f"invoice-{V3}", adapter_key=adapter_key(V3))
        routes = {r.name: r for r in parse_routes(config(upstream, server.url, adapters_dir)).routes}
        replicas = [AdapterLoader(routes, store), AdapterLoader(routes, store)]
        try:
            await asyncio.gather(*(r.hand_off(ROUTE, state) for r in replicas))
        finally:
            for r in replicas:
                await r.aclose()
        assert all(f"invoice-{V3}" in r.served[ROUTE] for r in replicas)
        assert sum(r.loads for r in replicas) >= 1
        assert (await served(server))[-1] == f"invoice-{V3}"
    changed = gw.recorder.of(Subject.ROUTE_CHANGED)
    assert [e.payload.reason for e in changed] == ["promote", "promote", "rollback"]


async def test_a_tampered_adapter_is_never_loaded(settings, store, upstream, local, made, monkeypatch) -> None:
    server, adapters_dir = local
    monkeypatch.setenv("TEST_LOCAL_KEY", KEY)
    monkeypatch.setenv("TEST_LOCAL_ADMIN_KEY", ADMIN_KEY)
    key = adapter_key(V1)
    await asyncio.to_thread(store.put_dir, key, made[V1])
    await asyncio.to_thread(store.put_bytes, f"{key}/adapter_config.json", b'{"swapped": true}')
    async for gw in gateway(settings, store, config(upstream, server.url, adapters_dir)):
        await set_route(settings, lambda s: promote(s, V1, "full", adapter_key=key))
        await asyncio.sleep(1.0)  # a few tries
        assert [await gw.ask() for _ in range(2)] == [("upstream", UPSTREAM_ANSWER, None)] * 2
    assert await served(server) == ["base"]
    assert not (adapters_dir / V1).exists() and list(adapters_dir.iterdir()) == []


async def test_only_the_recorded_adapter_is_loaded_and_a_restarted_server_gets_it_again(
        settings, store, upstream, local, made, monkeypatch) -> None:
    server, adapters_dir = local
    monkeypatch.setenv("TEST_LOCAL_KEY", KEY)
    monkeypatch.setenv("TEST_LOCAL_ADMIN_KEY", ADMIN_KEY)
    version = f"ad{RUN}-v4"
    name = f"invoice-{version}"
    # the promoted adapter (its index's sha256 is in the route state), and another one under the key named
    good = await asyncio.to_thread(store.put_dir, f"migrations/{version}/round-1/adapter", made[V1])
    await asyncio.to_thread(store.put_dir, adapter_key(version), made[V2])  # self-consistent, but not that one
    async for gw in gateway(settings, store, config(upstream, server.url, adapters_dir)):
        loader = gw.service.gateway.adapters
        await set_route(settings, lambda s: promote(s, version, "full", local_model=name,
                                                    adapter_key=adapter_key(version), adapter_sha256=good.sha256))
        await asyncio.sleep(1.0)  # a few tries
        assert await gw.ask() == ("upstream", UPSTREAM_ANSWER, None)
        assert name not in await served(server) and not (adapters_dir / version).exists()

        await set_route(settings, lambda s: promote(s, version, "full", adapter_key=good.key,
                                                    adapter_sha256=good.sha256))
        await gw.until_local(version)
        assert loader.loads == 1 and loader.reloads == 0

        # the local server restarts: its run-time adapters are gone, the gateway still believes it is loaded
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            reply = await http.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name})
            assert reply.status_code == 200, reply.text
        assert (await gw.ask())[0] == "upstream"  # this one falls back (404), and the loader forgets the name
        assert loader.reloads == 1
        await gw.until_local(version, seconds=20)  # loaded again, without a route change
        assert loader.loads == 2 and name in await served(server)
        loader.retry_seconds = 60.0  # bounded: not again within retry_seconds of the last time
        loader.lost(ROUTE, name)
        assert loader.reloads == 1 and name in loader.served[ROUTE]


def test_adapters_need_a_folder_and_versions_must_be_folder_names() -> None:
    route = {"name": "r", "upstream": {"provider": "openai-compatible", "model": "m", "base_url": "http://x/v1"},
             "local": {"base_url": "http://127.0.0.1:1/v1", "load_adapters": True}}
    with pytest.raises(SpecError, match=r"routes\.0\.local.*load_adapters needs adapters_dir"):
        parse_routes({"routes": [route]})
    assert version_folder("/srv/adapters", "m-abc").as_posix() == "/srv/adapters/m-abc"
    for bad in ("../etc", "a/b", "..", ""):
        with pytest.raises(HandOffError, match="cannot name a folder"):
            version_folder("/srv/adapters", bad)
