"""Judge bus adapter: ``judge.request`` (one shared durable consumer: add workers, throughput grows)
-> service-LLM judgements -> ``eval.scored``; and ``shadow.request`` (a gateway route's live answers, its own
durable consumer) -> ``shadow.scored`` (:mod:`llamaduo.services.judge.shadow`: same rubric, no budget).

A batch of a round whose judging the controller closed early (marker object
``round-N/judging-closed``, see the controller's early stopping) is acknowledged without a provider call
and without a reply; a holdout batch (``split: holdout``, judged once at the end with the chosen round's
adapter) is never skipped: it is judged in full, its scores stored under ``round-N/holdout/scores/``.
With a budget in the spec, every call goes through the migration's spend ledger (:mod:`llamaduo.providers.budget`);
a refused call leaves its answers unjudged and the reply says ``budget_exhausted``. The provider's rate limits
are shared by every judge replica (and the synthesizer) calling the same account
(:mod:`llamaduo.providers.shared_limits`).

Each judged batch's scores (one ``Score`` per answer, with its reason) are stored as one S3 object,
``round-N/scores/batch-XXXXX.jsonl``, before ``eval.scored`` is published: the controller keeps only their
statistics, and the synthesizer reads the failed items from there.

With ``judge.method: programmatic`` no provider is built: the checker named by ``judge.checker`` is
loaded once per migration and scores the answers (no calls, zero usage). A checker that cannot be loaded
is a permanent error: the batch is dead-lettered with the reason, and the controller fails the migration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from llamaduo.bus.broker import Bus, Delivery, PermanentError
from llamaduo.contracts.events import EvalScored, JudgeRequestEvent, ShadowRequestEvent, Subject
from llamaduo.providers.base import Provider, make_provider
from llamaduo.providers.budget import BudgetedProvider, budgeted_provider
from llamaduo.providers.shared_limits import make_shared_provider
from llamaduo.runtime.work_clock import WorkClock
from llamaduo.storage.keys import batch_scores_key
from llamaduo.storage.markers import ClosedRounds
from llamaduo.storage.store import ArtifactStore, SpecCache

if TYPE_CHECKING:
    from llamaduo.services.judge.checkers import Checker

log = logging.getLogger("llamaduo.judge")

JUDGING = Delivery(max_deliver=5, ack_wait=60.0, backoff=(2.0, 10.0, 30.0, 60.0))
#: A shadow comparison is one call: fewer retries (a lost one only thins the rolling window).
SHADOW_JUDGING = Delivery(max_deliver=3, ack_wait=60.0, backoff=(2.0, 10.0))


def register(bus: Bus, store: ArtifactStore) -> None:
    specs = SpecCache(store)
    providers: dict[str, Provider] = {}
    checkers: dict[str, Checker] = {}
    rounds = ClosedRounds(store)

    register_shadow(bus)

    @bus.consumer(Subject.JUDGE_REQUEST, "judge", JUDGING)
    async def on_judge_request(event: JudgeRequestEvent) -> None:
        """Score one batch of answers against the references (skipped when the round's judging is closed)."""
        from llamaduo.services.judge.checkers import check_items, load_checker
        from llamaduo.services.judge.domain import judge_items
        from llamaduo.tasks.plugins import CheckerError

        clock = WorkClock()
        split = event.payload.split
        if split == "eval" and await asyncio.to_thread(rounds.closed, event.migration_id, event.round):
            log.info("batch skipped: judging closed", extra={"migration_id": event.migration_id,
                                                              "round": event.round, "batch": event.payload.batch})
            return
        spec = await asyncio.to_thread(specs.get, event.migration_id)
        if spec.judge.method == "programmatic":
            if event.migration_id not in checkers:
                try:
                    checkers[event.migration_id] = await asyncio.to_thread(load_checker, spec.judge.checker)
                except CheckerError as err:
                    raise PermanentError(str(err)) from None
            with clock.stage("judge"):
                scores, usage = await check_items(event.payload.items, checkers[event.migration_id],
                                                  spec.judge.checker)
            judged_by, exhausted = f"programmatic:{spec.judge.checker}", False
        else:
            if event.migration_id not in providers:
                providers[event.migration_id] = await budgeted_provider(
                    bus, event.migration_id, spec.budget, await make_shared_provider(
                    bus, spec.judge_llm, spec.task, make=make_provider))
            provider = providers[event.migration_id]
            with clock.stage("judge"):
                scores, usage = await judge_items(event.payload.items, provider, spec.judge,
                                                  temperature=spec.judge_llm.temperature)
            judged_by = provider.name
            exhausted = isinstance(provider, BudgetedProvider) and provider.exhausted
        stored = await asyncio.to_thread(
            store.put_jsonl, batch_scores_key(event.migration_id, event.round, event.payload.batch, split), scores)
        await bus.emit(event.follow(Subject.EVAL_SCORED, EvalScored(
            batch=event.payload.batch, batches=event.payload.batches, scores=scores, usage=usage,
            provider=judged_by, budget_exhausted=exhausted, scores_ref=stored, split=split, work=clock.work(),
        ), key=f"scored-{event.payload.batch}" if split == "eval" else f"scored-{split}-{event.payload.batch}"))


def register_shadow(bus: Bus) -> None:
    """Consume ``shadow.request`` (durable ``judge-shadow``, shared by the judge replicas) -> ``shadow.scored``."""
    from llamaduo.bus.topology import JUDGE_SHADOW
    from llamaduo.contracts.spec import ProviderSpec, TaskSpec
    from llamaduo.services.judge.shadow import ShadowJudge

    async def make(spec: ProviderSpec, task: TaskSpec) -> Provider:
        return await make_shared_provider(bus, spec, task, make=make_provider)

    judge = ShadowJudge(make)

    @bus.consumer(Subject.SHADOW_REQUEST, JUDGE_SHADOW, SHADOW_JUDGING)
    async def on_shadow_request(event: ShadowRequestEvent) -> None:
        """Judge a route's local answer against its upstream answer (the eval rubric) -> ``shadow.scored``."""
        scored, usage = await judge.score(event.payload)
        log.info("shadow judged", extra={"route": scored.route, "version": scored.version,
                                         "similarity": scored.similarity, "failed": scored.failed,
                                         "calls": usage.calls if usage else 0})
        await bus.emit(event.follow(Subject.SHADOW_SCORED, scored, key=f"shadow-scored-{scored.request_id}"))
