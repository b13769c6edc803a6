"""Judge bus adapter: ``judge.request`` (one shared durable consumer: add workers, throughput grows)
-> service-LLM judgements -> ``eval.scored``."""

from __future__ import annotations

import asyncio

from llamaduo.bus import Bus, Delivery
from llamaduo.contracts import EvalScored, JudgeRequestEvent, Subject
from llamaduo.providers.base import Provider, make_provider
from llamaduo.store import ArtifactStore, SpecCache

JUDGING = Delivery(max_deliver=5, ack_wait=60.0, backoff=(2.0, 10.0, 30.0, 60.0))


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)
    providers: dict[str, Provider] = {}

    @bus.consumer(Subject.JUDGE_REQUEST, "judge", JUDGING)
    async def on_judge_request(event: JudgeRequestEvent) -> None:
        """Score one batch of answers against the references."""
        from llamaduo.services.judge.domain import judge_items

        spec = await asyncio.to_thread(specs.get, event.migration_id)
        if event.migration_id not in providers:
            providers[event.migration_id] = make_provider(spec.judge_llm, spec.task)
        provider = providers[event.migration_id]
        scores, usage = await judge_items(event.payload.items, provider, spec.judge,
                                          temperature=spec.judge_llm.temperature)
        await bus.emit(event.follow(Subject.EVAL_SCORED, EvalScored(
            batch=event.payload.batch, batches=event.payload.batches, scores=scores, usage=usage,
            provider=provider.name,
        ), key=f"scored-{event.payload.batch}"))
