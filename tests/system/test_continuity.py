"""Service continuity end to end (issue 12): capture -> a migration whose coverage data is the captured traffic ->
canary promotion -> full promotion -> rollback, each visible in ``/v1/models`` and in the events.

Real nats-server and S3 with the five migration services as processes (:class:`Embedded`), a gateway replica
in this process with the fake OpenAI server as the route's service LLM, and as its local side a
``llamaduo serve --adapters-dir`` app of the tiny base model, which gets the migrated LoRA adapter loaded at run
time. The official ``openai`` client is the application; ``llamaduo promote`` / ``llamaduo rollback`` are run as
an operator runs them. The gate is kept trivially passable (the task's oracle judges): this is about continuity,
not the student's quality (tests/system/test_e2e.py covers that).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fakes.llm_servers import FakeOpenAIServer, Recorded
from openai import AsyncOpenAI
from support.bus import Recorder

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, start_envelope
from llamaduo.runtime.embedded import Embedded
from llamaduo.services.gateway.app import GatewayService, bind
from llamaduo.services.gateway.config import parse_routes
from llamaduo.services.gateway.watch import register_watch
from llamaduo.serving.server import ServerThread
from llamaduo.tasks.triage import make_dataset, oracle

pytestmark = pytest.mark.slow

ROUTE = "triage"
USERS = [f"user-{i}" for i in range(16)]


def answer_as_service_llm(request: Recorded) -> str:
    return oracle.answer(request.messages[-1]["content"])


def spec() -> dict[str, Any]:
    return {
        "task": {"name": "ticket-triage", "system_prompt": "Route the ticket to one queue.",
                 "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": f"traffic:{ROUTE}", "seed": 0, "test_fraction": 0.25, "holdout_fraction": 0},
        "student": {
            "base_model": "tiny:llama", "method": "lora", "lora": {"r": 4, "dropout": 0.0},
            "training": {"epochs": 2, "learning_rate": 0.001, "batch_size": 8, "max_length": 96},
            "inference": {"max_new_tokens": 4, "batch_size": 16},
        },
        "judge": {"gate": "similarity_mean", "threshold": 0, "batch_size": 10},
        "budget": {"max_rounds": 1},
        "promotion": {"route": ROUTE, "mode": "canary", "canary_percent": 50},
    }


def unique(events: list[Any]) -> list[Any]:
    """Events once each (a core subscriber also sees JetStream deliveries to consumers of the subject)."""
    return list({e.event_id: e for e in events}.values())


class Scene:
    """The running pieces and what the test asks of them."""

    def __init__(self, env: Embedded, gateway: GatewayService, local: ServerThread, recorder: Recorder) -> None:
        self.env, self.gateway, self.local, self.recorder = env, gateway, local, recorder
        self.client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-app", max_retries=0, timeout=60)

    async def ask(self, ticket: str, user: str) -> str:
        reply = await self.client.chat.completions.create(
            model=ROUTE, messages=[{"role": "user", "content": ticket}], max_tokens=4, user=user)
        return reply.id

    async def route_model(self) -> dict[str, Any]:
        async with httpx2.AsyncClient() as http:
            data = (await http.get(f"{self.gateway.url}/v1/models")).json()["data"]
        return next(m for m in data if m["id"] == ROUTE)

    async def local_models(self) -> list[str]:
        async with httpx2.AsyncClient() as http:
            return [m["id"] for m in (await http.get(f"{self.local.url}/v1/models")).json()["data"]]

    async def wait_route(self, mode: str, version: str | None, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (model := await self.route_model())["mode"] != mode or model["version"] != version:
            assert time.monotonic() < deadline, f"the gateway never showed {mode} {version}: {model}"
            await asyncio.sleep(0.1)
        return model

    async def sides(self, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        """request id -> (answered_by, local_version) from traffic.logged."""
        for _ in range(200):
            logged = {e.payload.request_id: (e.payload.answered_by, e.payload.local_version)
                      for e in self.recorder.of(Subject.TRAFFIC_LOGGED)}
            if all(i in logged for i in ids):
                return {i: logged[i] for i in ids}
            await asyncio.sleep(0.05)
        raise AssertionError("traffic.logged missing for some requests")

    def cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "llamaduo.cli", *args], env=self.env.env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def services_alive(self) -> None:
        dead = [p for p in self.env.processes if p.proc.poll() is not None]
        assert not dead, f"{dead[0].name} exited: {dead[0].log_path.read_text()[-3000:]}"


async def installation_ready(env: Embedded, timeout: float = 60.0) -> None:
    """Wait for the services to have made the installation's stream (as they do when they start)."""
    import nats

    nc = await nats.connect(env.settings.nats_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.jetstream().stream_info(env.settings.stream_name)
                return
            except Exception:
                assert time.monotonic() < deadline, "the services never made the stream"
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def running(env: Embedded, upstream: FakeOpenAIServer, local: ServerThread, adapters_dir: Path,
                  shadow: dict[str, Any] | None = None) -> AsyncIterator[Scene]:
    """The gateway of the route; with ``shadow`` (the route's shadow section) its watch is registered and the bus's
    consumers started too, as :func:`llamaduo.services.gateway.app.register` has the service do."""
    config = parse_routes({"routes": [{
        "name": ROUTE,
        "upstream": {"provider": "openai-compatible", "model": "gpt-4o-mini", "base_url": upstream.base_url,
                     "max_retries": 0},
        "local": {"base_url": f"{local.url}/v1", "load_adapters": True, "adapters_dir": str(adapters_dir)},
        **({"shadow": shadow} if shadow is not None else {}),
    }], "capture": {"batch_rows": 1000, "batch_seconds": 0.5}})
    from llamaduo.storage.store import ArtifactStore

    await installation_ready(env)
    store = ArtifactStore(env.settings)
    store.ensure_bucket()
    bus = Bus(env.settings, "gateway")
    if shadow is not None:
        register_watch(bus, config)  # the replica consumes shadow.scored
    service = GatewayService(bus, store, config, bind("127.0.0.1", 0))
    assert service.gateway.adapters is not None
    service.gateway.adapters.retry_seconds = 0.5
    async with Recorder(env.settings) as recorder:
        if shadow is not None:
            await bus.broker.start()
        await service.start()
        scene = Scene(env, service, local, recorder)
        try:
            yield scene
        finally:
            await scene.client.close()
            await service.stop()
            await bus.broker.stop()


async def continuity(scene: Scene, tickets: list[str]) -> None:
    # (a) the application talks to the gateway; the service LLM answers and every pair is captured
    assert (await scene.route_model())["mode"] == "off"
    captured = [await scene.ask(t, USERS[i % len(USERS)]) for i, t in enumerate(tickets)]
    assert set((await scene.sides(captured)).values()) == {("upstream", None)}
    await asyncio.sleep(1.5)  # the capture's batch age: the rows are in S3

    # (b) a migration learns from the captured traffic and completes; its spec promotes it as a 50% canary
    migration_id = "cont-" + uuid.uuid4().hex[:6]
    bus = Bus(scene.env.settings, "test-client")
    await bus.broker.connect()
    try:
        await bus.emit(start_envelope(migration_id, spec()))
    finally:
        await bus.broker.stop()
    deadline = time.monotonic() + 120
    while not scene.recorder.of(Subject.MIGRATION_COMPLETED) and not scene.recorder.of(Subject.MIGRATION_FAILED):
        scene.services_alive()
        assert time.monotonic() < deadline, [e.type for e in scene.recorder.events][-20:]
        await asyncio.sleep(0.5)
    failed = scene.recorder.of(Subject.MIGRATION_FAILED)
    assert not failed, failed[0].payload
    assert {e.migration_id for e in scene.recorder.of(Subject.TRAIN_DONE)} == {migration_id}

    # (c) the canary: in the event and /v1/models; its adapter loaded into the running local server
    [changed] = unique(await scene.recorder.wait_for(Subject.ROUTE_CHANGED))
    assert (changed.payload.mode, changed.payload.percent, changed.payload.version) == ("canary", 50, migration_id)
    assert changed.payload.adapter_key and changed.migration_id == migration_id
    assert (await scene.wait_route("canary", migration_id))["percent"] == 50
    deadline = time.monotonic() + 30
    while migration_id not in await scene.local_models():
        assert time.monotonic() < deadline, "the adapter was never loaded into the local server"
        await asyncio.sleep(0.2)
    canary = [await scene.ask(tickets[i], user) for i, user in enumerate(USERS)]
    sides = await scene.sides(canary)
    assert {side for side, _ in sides.values()} == {"local", "upstream"}  # split by user
    assert {v for side, v in sides.values() if side == "local"} == {migration_id}

    # (d) the operator promotes the version fully (the CLI): everything local
    out = scene.cli("promote", ROUTE, "--version", migration_id, "--mode", "full")
    assert out["after"]["mode"] == "full"
    await scene.wait_route("full", migration_id)
    full = [await scene.ask(tickets[i], user) for i, user in enumerate(USERS[:6])]
    assert set((await scene.sides(full)).values()) == {("local", migration_id)}

    # (e) and rolls it back (the CLI): the last change undone, the 50% canary of this version again
    out = scene.cli("rollback", ROUTE)
    assert (out["after"]["mode"], out["after"]["percent"], out["before"]["mode"]) == ("canary", 50, "full")
    assert out["after"]["adapter_key"] == changed.payload.adapter_key
    await scene.wait_route("canary", migration_id)
    back = [await scene.ask(tickets[i], user) for i, user in enumerate(USERS)]
    again = list((await scene.sides(back)).values())
    assert {side for side, _ in again} == {"local", "upstream"} and {v for s, v in again if s == "local"} == {
        migration_id}
    was_local = [side == "local" for side, _ in sides.values()]  # (a canary answer may have fallen back)
    assert all(side == "local" for (side, _), local_then in zip(again, was_local, strict=True) if local_then)
    changes = unique(await scene.recorder.wait_for(Subject.ROUTE_CHANGED, count=3))
    assert [(e.payload.reason, e.payload.mode) for e in changes] == [
        ("promote", "canary"), ("promote", "full"), ("rollback", "canary")]
    assert changes[-1].payload.previous.version == migration_id


def tiny_local_server(tmp_path: Path) -> tuple[ServerThread, Path]:
    """``llamaduo serve``'s app on the tiny base (the services' own: set ``LLAMADUO_CACHE_DIR`` first) with the
    adapters folder a promoted version's adapter is loaded into; ``(server, folder)``, the caller stops it."""
    from llamaduo.models.resolve import resolve_base_model
    from llamaduo.serving.app import create_app

    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    local = ServerThread.start(create_app({"tiny-base": Path(resolve_base_model("tiny:llama"))},
                                          adapters_dir=adapters_dir))
    return local, adapters_dir


def test_capture_migrate_canary_full_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))  # the services' tiny base is this one
    tickets = [row["instruction"] for row in make_dataset(n_train=0, n_test=32, seed=5)]
    local, adapters_dir = tiny_local_server(tmp_path)
    started = time.monotonic()
    try:
        with FakeOpenAIServer(responder=answer_as_service_llm) as upstream, Embedded(tmp_path / "install") as env:

            async def scenario() -> None:
                async for scene in running(env, upstream, local, adapters_dir):
                    await continuity(scene, tickets)

            asyncio.run(scenario())
    finally:
        local.stop()
    print(f"continuity: {time.monotonic() - started:.0f}s")
