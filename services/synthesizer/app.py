"""Synthesizer bus adapter: ``synth.request`` -> new examples from train seeds, deduplicated and
decontaminated -> dataset to S3 -> ``synth.ready``."""

from __future__ import annotations

import asyncio

from llamaduo.bus import Bus, Delivery
from llamaduo.contracts import Subject, SynthReady, SynthRequestEvent
from llamaduo.examples import Example
from llamaduo.providers.base import make_provider
from llamaduo.store import ArtifactStore, SpecCache, data_key, round_key

SYNTHESIS = Delivery(max_deliver=4, ack_wait=60.0, backoff=(2.0, 10.0, 30.0))


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    def load(migration_id: str, split: str) -> list[Example]:
        return [Example.model_validate(r) for r in store.iter_jsonl(data_key(migration_id, split))]

    @bus.consumer(Subject.SYNTH_REQUEST, "synthesizer", SYNTHESIS)
    async def on_synth_request(event: SynthRequestEvent) -> None:
        """Ask the teacher for new training data like the train-split seeds."""
        from llamaduo.services.synthesizer.domain import synthesize

        spec = await asyncio.to_thread(specs.get, event.migration_id)
        train = await asyncio.to_thread(load, event.migration_id, "train")
        test = await asyncio.to_thread(load, event.migration_id, "test")
        provider = make_provider(spec.teacher, spec.task)
        try:
            result = await synthesize(train, test, event.payload, spec.synthesis, provider, round=event.round,
                                      seed=spec.dataset.seed, system_prompt=spec.task.system_prompt,
                                      near_duplicate_threshold=spec.synthesis.near_duplicate_threshold)
        finally:
            await provider.aclose()
        dataset = await asyncio.to_thread(
            store.put_jsonl, round_key(event.migration_id, event.round, "synthetic.jsonl"), result.examples)
        await bus.emit(event.follow(Subject.SYNTH_READY, SynthReady(
            dataset=dataset, generated=result.generated, kept=result.kept, removed=result.removed,
            seed_ids=result.seed_ids, usage=result.usage, provider=provider.name,
        ), key="ready"))
