"""Controller bus adapter: state in JetStream KV, transitions in :mod:`.domain`.

Order per event: load state -> publish what an earlier run left in the outbox -> apply -> save the state with
the outputs in its outbox (CAS) -> markers, manifest, report -> publish the outputs (deterministic ids) ->
save the state with the outbox cleared -> ack. A client that sees an event (``migration.completed``) reads a
state that already includes it. A crash anywhere is safe: before the first save the event re-runs on
redelivery; after it, the next transition of the migration (the redelivery itself) publishes the outbox again,
same ids, and JetStream drops the copies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.bus.topology import CONTROLLER_START, open_bucket
from llamaduo.contracts.events import (
    DeadLetter,
    Envelope,
    EvalScoredEvent,
    InferDoneEvent,
    MigrationCancelEvent,
    MigrationFailed,
    MigrationStartEvent,
    Score,
    Subject,
    SynthReadyEvent,
    TrainDoneEvent,
    deterministic_id,
    validate_migration_id,
)
from llamaduo.contracts.spec import MigrationSpec, SpecError, parse_spec
from llamaduo.contracts.state import DataRefs, GateStats, MigrationState
from llamaduo.data.datasets import DatasetError, load_splits
from llamaduo.reporting.manifest import write_manifest
from llamaduo.settings import Settings
from llamaduo.storage.keys import batch_scores_key, data_key, judging_closed_key, spec_key
from llamaduo.storage.store import ArtifactStore
from llamaduo.tasks.plugins import refused_code

from . import domain
from .ending import awaiting_baseline_lookup, begin_baseline
from .promotion import Promoter

log = logging.getLogger("llamaduo.controller")

CONTROL = Delivery(max_deliver=5, ack_wait=120.0, backoff=(1.0, 3.0, 10.0, 30.0))


class StateStore:
    """Migration states in a JetStream KV bucket, updated with compare-and-set."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._kv: Any = None

    async def kv(self) -> Any:
        if self._kv is None:
            self._kv = await open_bucket(self._bus.broker, self._bus.settings, self._bus.settings.kv_bucket, history=5)
        return self._kv

    async def load(self, migration_id: str) -> tuple[MigrationState | None, int | None]:
        from nats.js.errors import KeyNotFoundError

        kv = await self.kv()
        try:
            entry = await kv.get(migration_id)
        except KeyNotFoundError:
            return None, None
        if entry.value is None:
            return None, None
        return MigrationState.model_validate_json(entry.value), entry.revision

    async def save(self, state: MigrationState, revision: int | None) -> int:
        """Write ``state`` (create when ``revision`` is None, else compare-and-set); return the new revision."""
        kv = await self.kv()
        data = state.model_dump_json().encode()
        if revision is None:
            return int(await kv.create(state.migration_id, data))
        return int(await kv.update(state.migration_id, data, last=revision))


def _outbox(outputs: list[Envelope]) -> list[Envelope[dict[str, Any]]]:
    return [Envelope[dict[str, Any]].model_validate(o.model_dump(mode="json")) for o in outputs]


def _prepare(store: ArtifactStore, migration_id: str, spec: MigrationSpec, settings: Settings) -> DataRefs:
    """Load and split the coverage dataset, then store the splits (written once; the eval split as ``test``, the
    holdout only when it has rows) and the spec (blocking I/O).

    An ``s3://`` source must lie under this migration's prefix or an operator-allowed dataset prefix; a
    ``traffic:<route>`` source is read from the route's captured batches (:mod:`llamaduo.data.traffic`)."""

    def fetch_s3(uri: str) -> bytes:
        return store.fetch_dataset_source(migration_id, uri, settings.allowed_dataset_prefixes)

    splits = load_splits(spec.dataset, fetch_s3=fetch_s3, traffic_store=store)
    store.put_json(spec_key(migration_id), spec.model_dump(mode="json"))
    return DataRefs(
        train=store.put_jsonl(data_key(migration_id, "train"), splits.train, once=True),
        coverage=store.put_jsonl(data_key(migration_id, "coverage"), splits.coverage, once=True),
        test=store.put_jsonl(data_key(migration_id, "test"), splits.test, once=True),
        holdout=store.put_jsonl(data_key(migration_id, "holdout"), splits.holdout, once=True)
        if splits.holdout else None,
    )


def _write_html_report(store: ArtifactStore, state: MigrationState, work_dir: Path) -> None:
    """The HTML report is for people: failing to draw it never fails the migration."""
    from llamaduo.reporting.html import write_report

    try:
        with tempfile.TemporaryDirectory(dir=_mkdir(work_dir)) as tmp:
            write_report(store, state.migration_id, Path(tmp))
    except Exception:
        log.exception("report not written", extra={"migration_id": state.migration_id})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def register(bus: Bus, store: ArtifactStore) -> None:
    states = StateStore(bus)
    promoter = Promoter(bus)
    locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def flush(state: MigrationState, rev: int) -> int:
        """Publish the outbox of an earlier (possibly interrupted) transition, then clear it."""
        if not state.outbox:
            return rev
        for out in state.outbox:
            await bus.emit(out)
        state.outbox = []
        return await states.save(state, rev)

    async def commit(state: MigrationState, rev: int | None, outputs: list[Envelope]) -> None:
        """Save ``state`` with ``outputs`` in its outbox, then publish them and clear the outbox."""
        state.outbox = _outbox(outputs)
        rev = await states.save(state, rev)
        await asyncio.to_thread(write_manifest, store, state)
        if state.done:
            await asyncio.to_thread(_write_html_report, store, state, bus.settings.work_dir)
        await flush(state, rev)

    async def transition(event: Envelope, apply: Callable[[MigrationState], list[Envelope]],
                         threaded: bool = False,
                         before_commit: Callable[[MigrationState], Awaitable[None]] | None = None) -> bool:
        """Apply ``event`` to its migration's state and commit the outputs; False when there is no such
        migration. ``before_commit`` runs after ``apply``, before anything is saved or published; so do the
        look-up of the route's current version when the migration passed with ``promotion.only_if_better`` (its
        adapter copied, the baseline requested) and the promotion of a migration the event completed (route state
        written, ``route.changed`` added)."""
        async with locks[event.migration_id]:
            state, rev = await states.load(event.migration_id)
            if state is None or rev is None:
                return False
            rev = await flush(state, rev)
            if event.event_id in state.applied:
                return True
            closed_before = {r.round for r in state.rounds if r.judging_closed}
            outputs = await asyncio.to_thread(apply, state) if threaded else apply(state)
            if before_commit is not None:
                await before_commit(state)
            if awaiting_baseline_lookup(state):  # passed with only_if_better: judge the route's current version
                version, adapter, why = await promoter.baseline(state, store)
                outputs = [*outputs, *begin_baseline(state, event, version, adapter, note=why)]
            outputs = [*outputs, *await promoter.on_transition(state, outputs)]
            state.mark_applied(event.event_id)
            for rnd in state.rounds:  # judging closed with batches left: judge workers skip them
                if rnd.judging_closed and rnd.round not in closed_before:
                    await asyncio.to_thread(store.put_json, judging_closed_key(state.migration_id, rnd.round),
                                            {"round": rnd.round, "decision": rnd.summary.decision
                                             if rnd.summary else None, "cause": event.event_id})
            await commit(state, rev, outputs)
            return True

    @bus.consumer(Subject.MIGRATION_START, CONTROLLER_START, CONTROL)
    async def on_start(event: MigrationStartEvent) -> None:
        """Open a migration: validate the spec, store the data splits, request round 0 training."""
        async with locks[event.migration_id]:
            existing, rev = await states.load(event.migration_id)
            if existing is not None and rev is not None:
                await flush(existing, rev)
                log.info("duplicate migration.start ignored", extra={"migration_id": event.migration_id})
                return
            try:
                spec = parse_spec(event.payload.spec, origin=f"of migration {event.migration_id}")
                if refused := refused_code(spec, bus.settings):  # checked before any worker imports it
                    raise SpecError(f"spec of migration {event.migration_id} names code that is not allowed:\n"
                                    + "\n".join(f"  - {line}" for line in refused))
                data = await asyncio.to_thread(_prepare, store, event.migration_id, spec, bus.settings)
            except (SpecError, DatasetError) as err:
                reason = "spec" if isinstance(err, SpecError) else "dataset"
                out = domain.failed_before_start(event, reason, str(err))
                refused = MigrationState(migration_id=event.migration_id, correlation_id=event.correlation_id,
                                         stage=domain.Stage.FAILED, spec=event.payload.spec,
                                         applied=[event.event_id], outcome=reason)
                await commit(refused, None, [out])
                log.warning("migration refused", extra={"migration_id": event.migration_id, "reason": reason})
                return
            state, outputs = domain.start(event, spec, data)
            await commit(state, None, outputs)
            log.info("migration started", extra={"migration_id": event.migration_id,
                                                 "coverage_rows": data.coverage.rows, "test_rows": data.test.rows,
                                                 "holdout_rows": data.holdout.rows if data.holdout else 0})

    @bus.consumer(Subject.TRAIN_DONE, "controller-train-done", CONTROL)
    async def on_train_done(event: TrainDoneEvent) -> None:
        await transition(event, lambda s: domain.on_train_done(s, event))

    @bus.consumer(Subject.INFER_DONE, "controller-infer-done", CONTROL)
    async def on_infer_done(event: InferDoneEvent) -> None:
        await transition(event, lambda s: domain.on_infer_done(s, event))

    @bus.consumer(Subject.EVAL_SCORED, "controller-eval-scored", CONTROL)
    async def on_eval_scored(event: EvalScoredEvent) -> None:
        """Collect judged batches; gate the round when all are in. Runs in a thread: it may re-read a batch's
        scores from S3 (one that arrived far ahead of the published order)."""

        def load(round: int, batch: int) -> GateStats:
            return GateStats.from_scores(store.read_models(batch_scores_key(event.migration_id, round, batch), Score))

        await transition(event, lambda s: domain.on_eval_scored(s, event, load), threaded=True)

    @bus.consumer(Subject.SYNTH_READY, "controller-synth-ready", CONTROL)
    async def on_synth_ready(event: SynthReadyEvent) -> None:
        await transition(event, lambda s: domain.on_synth_ready(s, event))

    @bus.consumer(Subject.MIGRATION_CANCEL, "controller-cancel", CONTROL)
    async def on_cancel(event: MigrationCancelEvent) -> None:
        """End the migration as cancelled, keeping its best round. Its id goes to the cancelled-migrations
        bucket before the terminal event is out, so every service has stopped its work by then."""

        async def mark_cancelled(state: MigrationState) -> None:
            if state.stage == domain.Stage.CANCELLED:
                await bus.cancelled.mark(state.migration_id, {
                    "event_id": event.event_id, "reason": event.payload.reason,
                    "requested_by": event.payload.requested_by, "at": event.occurred_at.isoformat()})

        if await transition(event, lambda s: domain.cancel(s, event), before_commit=mark_cancelled):
            log.info("migration cancel applied", extra={"migration_id": event.migration_id,
                                                        "requested_by": event.payload.requested_by})
        else:
            log.warning("cancel of an unknown migration ignored", extra={"migration_id": event.migration_id})

    @bus.consumer("dlq.>", "controller-dlq", CONTROL, title="dlq:controller")
    async def on_dead_letter(letter: DeadLetter) -> None:
        """Work that could not be done fails its migration (keeping the best model so far)."""
        plain = bus.settings.unprefixed(letter.subject)
        if plain == Subject.MIGRATION_START:
            await start_dead_lettered(letter)
            return
        if not letter.migration_id or plain.startswith("dlq."):
            return
        try:
            cause = Envelope.model_validate_json(letter.body)
        except ValueError:
            return
        detail = f"{letter.subject} dead-lettered by {letter.service}: {letter.reason}"
        await transition(cause, lambda s: domain.fail(s, cause, "dead_letter", detail))

    async def start_dead_lettered(letter: DeadLetter) -> None:
        """A ``migration.start`` nobody could process (e.g. it fails validation): when its migration id can be
        read and the migration has no state yet, fail it with the reason, so a client waiting on it learns why."""
        try:
            body = json.loads(letter.body)
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        migration_id = letter.migration_id or body.get("migration_id")
        try:
            validate_migration_id(str(migration_id))
        except ValueError:
            return
        mid = str(migration_id)
        start_id = body.get("event_id") if isinstance(body.get("event_id"), str) else deterministic_id("start", mid)
        correlation = body.get("correlation_id") if isinstance(body.get("correlation_id"), str) else start_id
        async with locks[mid]:
            existing, rev = await states.load(mid)
            if existing is not None and rev is not None:
                await flush(existing, rev)
                return
            invalid = letter.reason.startswith("schema:") or "validation error" in letter.reason.lower()
            reason = "spec" if invalid else "dead_letter"
            out = Envelope(
                event_id=deterministic_id(start_id, Subject.MIGRATION_FAILED, 0, "failed"), migration_id=mid,
                round=0, type=Subject.MIGRATION_FAILED, correlation_id=correlation, causation_id=start_id,
                payload=MigrationFailed(reason=reason, detail=f"migration.start dead-lettered by {letter.service}: "
                                        f"{letter.reason}"))
            spec = body.get("payload", {}).get("spec") if isinstance(body.get("payload"), dict) else None
            refused = MigrationState(migration_id=mid, correlation_id=correlation, stage=domain.Stage.FAILED,
                                     spec=spec if isinstance(spec, dict) else {}, applied=[start_id], outcome=reason)
            await commit(refused, None, [out])
            log.warning("dead-lettered migration.start failed its migration",
                        extra={"migration_id": mid, "reason": reason})
