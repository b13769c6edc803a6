"""Controller bus adapter: state in JetStream KV, transitions in :mod:`.domain`.

Order per event: load state -> apply -> publish outputs (deterministic ids) -> save state (CAS) -> ack.
A crash anywhere re-runs the event on redelivery with no double effect.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaduo.bus.broker import Bus, Delivery
from llamaduo.bus.topology import CONTROLLER_START
from llamaduo.contracts.events import (
    DeadLetter,
    Envelope,
    EvalScoredEvent,
    InferDoneEvent,
    MigrationStartEvent,
    Subject,
    SynthReadyEvent,
    TrainDoneEvent,
)
from llamaduo.contracts.spec import MigrationSpec, SpecError, parse_spec
from llamaduo.contracts.state import DataRefs, MigrationState
from llamaduo.data.datasets import DatasetError, load_splits
from llamaduo.reporting.manifest import write_manifest
from llamaduo.storage.keys import data_key, judging_closed_key, spec_key
from llamaduo.storage.store import ArtifactStore

from . import domain

log = logging.getLogger("llamaduo.controller")

CONTROL = Delivery(max_deliver=5, ack_wait=120.0, backoff=(1.0, 3.0, 10.0, 30.0))


class StateStore:
    """Migration states in a JetStream KV bucket, updated with compare-and-set."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._kv: Any = None

    async def kv(self) -> Any:
        if self._kv is None:
            self._kv = await self._bus.broker.key_value(self._bus.settings.kv_bucket, history=5)
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

    async def save(self, state: MigrationState, revision: int | None) -> None:
        kv = await self.kv()
        data = state.model_dump_json().encode()
        if revision is None:
            await kv.create(state.migration_id, data)
        else:
            await kv.update(state.migration_id, data, last=revision)


def _prepare(store: ArtifactStore, migration_id: str, spec: MigrationSpec) -> DataRefs:
    """Load and split the coverage dataset, then store the splits and the spec (blocking I/O)."""

    def fetch_s3(uri: str) -> bytes:
        bucket, _, key = uri[len("s3://"):].partition("/")
        if bucket != store.bucket:
            raise DatasetError(f"dataset.source {uri}: only the installation's bucket {store.bucket!r} is readable")
        return store.get_bytes(key)

    splits = load_splits(spec.dataset, fetch_s3=fetch_s3)
    store.put_json(spec_key(migration_id), spec.model_dump(mode="json"))
    return DataRefs(
        train=store.put_jsonl(data_key(migration_id, "train"), splits.train),
        coverage=store.put_jsonl(data_key(migration_id, "coverage"), splits.coverage),
        test=store.put_jsonl(data_key(migration_id, "test"), splits.test),
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
    locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def transition(event: Envelope, apply: Callable[[MigrationState], list[Envelope]]) -> None:
        async with locks[event.migration_id]:
            state, rev = await states.load(event.migration_id)
            if state is None or event.event_id in state.applied:
                return
            closed_before = {r.round for r in state.rounds if r.judging_closed}
            outputs = apply(state)
            state.applied.append(event.event_id)
            for rnd in state.rounds:  # judging closed with batches left: judge workers skip them
                if rnd.judging_closed and rnd.round not in closed_before:
                    await asyncio.to_thread(store.put_json, judging_closed_key(state.migration_id, rnd.round),
                                            {"round": rnd.round, "decision": rnd.summary.decision
                                             if rnd.summary else None, "cause": event.event_id})
            for out in outputs:
                await bus.emit(out)
            await asyncio.to_thread(write_manifest, store, state)
            if state.done:
                await asyncio.to_thread(_write_html_report, store, state, bus.settings.work_dir)
            await states.save(state, rev)

    @bus.consumer(Subject.MIGRATION_START, CONTROLLER_START, CONTROL)
    async def on_start(event: MigrationStartEvent) -> None:
        """Open a migration: validate the spec, store the data splits, request round 0 training."""
        async with locks[event.migration_id]:
            existing, _ = await states.load(event.migration_id)
            if existing is not None:
                log.info("duplicate migration.start ignored", extra={"migration_id": event.migration_id})
                return
            try:
                spec = parse_spec(event.payload.spec, origin=f"of migration {event.migration_id}")
                data = await asyncio.to_thread(_prepare, store, event.migration_id, spec)
            except (SpecError, DatasetError) as err:
                reason = "spec" if isinstance(err, SpecError) else "dataset"
                out = domain.failed_before_start(event, reason, str(err))
                await bus.emit(out)
                refused = MigrationState(migration_id=event.migration_id, correlation_id=event.correlation_id,
                                         stage=domain.Stage.FAILED, spec=event.payload.spec,
                                         applied=[event.event_id], outcome=reason)
                await states.save(refused, None)
                log.warning("migration refused", extra={"migration_id": event.migration_id, "reason": reason})
                return
            state, outputs = domain.start(event, spec, data)
            for out in outputs:
                await bus.emit(out)
            await asyncio.to_thread(write_manifest, store, state)
            await states.save(state, None)
            log.info("migration started", extra={"migration_id": event.migration_id,
                                                 "coverage_rows": data.coverage.rows, "test_rows": data.test.rows})

    @bus.consumer(Subject.TRAIN_DONE, "controller-train-done", CONTROL)
    async def on_train_done(event: TrainDoneEvent) -> None:
        await transition(event, lambda s: domain.on_train_done(s, event))

    @bus.consumer(Subject.INFER_DONE, "controller-infer-done", CONTROL)
    async def on_infer_done(event: InferDoneEvent) -> None:
        await transition(event, lambda s: domain.on_infer_done(s, event))

    @bus.consumer(Subject.EVAL_SCORED, "controller-eval-scored", CONTROL)
    async def on_eval_scored(event: EvalScoredEvent) -> None:
        """Collect judged batches; gate the round when all are in."""
        await transition(event, lambda s: domain.on_eval_scored(s, event))

    @bus.consumer(Subject.SYNTH_READY, "controller-synth-ready", CONTROL)
    async def on_synth_ready(event: SynthReadyEvent) -> None:
        await transition(event, lambda s: domain.on_synth_ready(s, event))

    @bus.consumer("dlq.>", "controller-dlq", CONTROL, title="dlq:controller")
    async def on_dead_letter(letter: DeadLetter) -> None:
        """Work that could not be done fails its migration (keeping the best model so far)."""
        plain = bus.settings.unprefixed(letter.subject)
        if not letter.migration_id or plain == Subject.MIGRATION_START or plain.startswith("dlq."):
            return
        try:
            cause = Envelope.model_validate_json(letter.body)
        except ValueError:
            return
        detail = f"{letter.subject} dead-lettered by {letter.service}: {letter.reason}"
        await transition(cause, lambda s: domain.fail(s, cause, "dead_letter", detail))
