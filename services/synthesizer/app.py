"""Synthesizer bus adapter: ``synth.request`` -> new examples from train seeds, deduplicated and
decontaminated (against the eval and holdout splits) -> dataset to S3 -> ``synth.ready``. Targeting reads the
eval split and the failed ids of the judged round's eval score objects (``round-N/scores/``) only, never the
holdout.

With a budget in the spec, every teacher call goes through the migration's spend ledger
(:mod:`llamaduo.providers.budget`): a call that could exceed it is not made, and ``synth.ready`` says
``budget_exhausted`` (with whatever was kept before). The teacher's rate limits are shared by every
replica calling the same account (:mod:`llamaduo.providers.shared_limits`).
"""

from __future__ import annotations

import asyncio

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.contracts.events import Score, Subject, SynthReady, SynthRequestEvent
from llamaduo.data.examples import Example
from llamaduo.providers.base import make_provider
from llamaduo.providers.budget import BudgetedProvider, budgeted_provider
from llamaduo.providers.shared_limits import make_shared_provider
from llamaduo.runtime.work_clock import WorkClock
from llamaduo.services.synthesizer.seeds import shortfalls_worst_first
from llamaduo.storage.keys import batch_scores_prefix, data_key, round_key
from llamaduo.storage.store import ArtifactStore, SpecCache

SYNTHESIS = Delivery(max_deliver=4, ack_wait=60.0, backoff=(2.0, 10.0, 30.0))


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)

    @bus.consumer(Subject.SYNTH_REQUEST, "synthesizer", SYNTHESIS)
    async def on_synth_request(event: SynthRequestEvent) -> None:
        """Ask the teacher for new training data like the train-split seeds."""
        from llamaduo.services.synthesizer.domain import synthesize

        clock = WorkClock()
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        train = await asyncio.to_thread(store.read_models, data_key(event.migration_id, "train"), Example)
        test = await asyncio.to_thread(store.read_models, data_key(event.migration_id, "test"), Example)
        holdout = await asyncio.to_thread(_holdout, store, event.migration_id)
        earlier = await asyncio.to_thread(_earlier_synthetic, store, event.migration_id, event.round)
        request = event.payload
        if request.scores_round is not None:  # failed test items, from the judged round's score objects
            def failed_ids(round: int) -> list[str]:
                keys = store.list(batch_scores_prefix(event.migration_id, round))
                return shortfalls_worst_first((s for k in keys for s in store.read_models(k, Score)), spec.judge)
            ids = await asyncio.to_thread(failed_ids, request.scores_round)
            request = request.model_copy(update={"failed_item_ids": ids})
        provider = await budgeted_provider(bus, event.migration_id, spec.budget,
                                           await make_shared_provider(bus, spec.teacher, spec.task,
                                                                      make=make_provider))
        try:
            with clock.stage("synthesize"):
                    result = await synthesize(train, test, request, spec.synthesis, provider, round=event.round,
                                          seed=spec.dataset.seed, system_prompt=spec.task.system_prompt,
                                          near_duplicate_threshold=spec.synthesis.near_duplicate_threshold,
                                          earlier=earlier, holdout=holdout,
                                          should_cancel=bus.cancelled.checker(event.migration_id))
        finally:
            await provider.aclose()
        exhausted = isinstance(provider, BudgetedProvider) and provider.exhausted
        dataset = await asyncio.to_thread(
            store.put_jsonl, round_key(event.migration_id, event.round, "synthetic.jsonl"), result.examples,
            once=True)
        await bus.emit(event.follow(Subject.SYNTH_READY, SynthReady(
            dataset=dataset, generated=result.generated, kept=result.kept, removed=result.removed,
            seed_ids=result.seed_ids, usage=result.usage, provider=provider.name, budget_exhausted=exhausted,
            work=clock.work(),
        ), key="ready"))


def _holdout(store: ArtifactStore, migration_id: str) -> list[Example]:
    """The migration's holdout split (none when it has no holdout): decontaminated against, never targeted."""
    key = data_key(migration_id, "holdout")
    return store.read_models(key, Example) if store.exists(key) else []


def _earlier_synthetic(store: ArtifactStore, migration_id: str, round: int) -> list[Example]:
    """The synthetic rows kept by the migration's earlier rounds (those that wrote any), oldest first."""
    keys = [round_key(migration_id, r, "synthetic.jsonl") for r in range(round)]
    return [e for key in keys if store.exists(key) for e in store.read_models(key, Example)]
