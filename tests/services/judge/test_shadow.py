"""The judge service on shadow.request (issue 12 item 6): a real nats-server, the judge's bus adapter, and the fake
OpenAI server as the route's judge -> shadow.scored with the rubric's scores, or failed with the reason."""

from __future__ import annotations

import json
from typing import Any

from fakes.llm_servers import FakeOpenAIServer, Reply
from support.bus import Recorder

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, route_envelope
from llamaduo.contracts.gateway import ChatMessage, ShadowRequest
from llamaduo.contracts.spec import ProviderSpec
from llamaduo.services.judge.app import register
from llamaduo.storage.store import ArtifactStore


def shadow_request(request_id: str, judge: ProviderSpec | None) -> ShadowRequest:
    return ShadowRequest(route="invoice", request_id=request_id, version="m-v1", instruction="Invoice 7: which queue?",
                         messages=[ChatMessage(role="user", content="Invoice 7: which queue?")],
                         reference='{"queue": "billing"}', candidate='{"queue": "shipping"}',
                         system_prompt="Route the invoice.", judge=judge)


def judge_spec(server: FakeOpenAIServer, **over: Any) -> ProviderSpec:
    fields: dict[str, Any] = {"provider": "openai-compatible", "model": "judge-model", "base_url": server.base_url,
                              "max_retries": 0, **over}
    return ProviderSpec(**fields)


async def judged(settings: Any, *requests: ShadowRequest) -> list[Any]:
    bus = Bus(settings, "judge")
    register(bus, ArtifactStore(settings))
    await bus.broker.start()
    try:
        async with Recorder(settings) as recorder:
            for request in requests:
                await bus.emit(route_envelope(Subject.SHADOW_REQUEST, request, "invoice", migration_id="m-v1",
                                              key=request.request_id))
            return await recorder.wait_for(Subject.SHADOW_SCORED, count=len(requests), timeout=30)
    finally:
        await bus.broker.stop()


async def test_a_shadow_request_is_judged_with_the_rubric(settings) -> None:
    verdict = json.dumps({"similarity": 35, "precision": 40, "reason": "a different queue"})
    with FakeOpenAIServer(responder=Reply.ok("not a judgement")) as server:
        server.push(Reply.ok("not a judgement"), Reply.ok(verdict))  # one re-ask, as for an eval batch
        [scored] = await judged(settings, shadow_request("r1", judge_spec(server)))
        asked = server.requests
    assert scored.route == "invoice" and scored.migration_id == "m-v1"
    assert scored.payload.request_id == "r1" and scored.payload.version == "m-v1" and not scored.payload.failed
    assert (scored.payload.similarity, scored.payload.precision) == (35, 40)
    assert scored.payload.reason == "a different queue"
    assert len(asked) == 2 and asked[0].body["model"] == "judge-model"
    prompt = asked[0].messages[-1]["content"]
    assert all(text in prompt for text in ("Invoice 7", '"billing"', '"shipping"', "similarity"))


async def test_judging_that_fails_says_why(settings, monkeypatch) -> None:
    monkeypatch.delenv("ABSENT_JUDGE_KEY", raising=False)
    with FakeOpenAIServer(responder=Reply.error(400, "bad request")) as server:
        scores = await judged(settings, shadow_request("r-error", judge_spec(server)),
                              shadow_request("r-nokey", judge_spec(server, provider="openai",
                                                                         api_key_env="ABSENT_JUDGE_KEY")),
                              shadow_request("r-nojudge", None))
    by_id = {e.payload.request_id: e.payload for e in scores}
    assert all(p.failed and p.similarity is None for p in by_id.values())
    assert "judging failed" in by_id["r-error"].reason
    assert "ABSENT_JUDGE_KEY" in by_id["r-nokey"].reason
    assert "names no judge" in by_id["r-nojudge"].reason
