"""The bus adapter: FastStream over NATS JetStream, configured one way for every service.

- One file-backed stream holds every subject family (plus ``dlq.>``), so the event log survives restarts.
- Publishing sets ``Nats-Msg-Id`` from the envelope's ``event_id``: JetStream drops a duplicate.
- Consumers are durable pull consumers with explicit ack *after* the work; a long job keeps its message
  with ``in_progress`` heartbeats. A failing handler is redelivered with backoff up to ``max_deliver``
  times; a message that fails validation, or exhausts its deliveries, goes to ``dlq.<subject>`` with the
  reason and is terminated so the consumer keeps going.
- A message of a cancelled migration (see :mod:`llamaduo.bus.cancellation`) is acked and skipped before its
  handler runs; work that stops because its migration was cancelled is acked too, and no non-terminal event
  of a cancelled migration is published.
- Every delivery is counted and timed (:mod:`llamaduo.runtime.metrics`: by subject and outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from faststream import AckPolicy, BaseMiddleware
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from pydantic import ValidationError

from llamaduo.bus.cancellation import CancelledMigrations, MigrationCancelled, migration_of
from llamaduo.bus.connection import broker_kwargs
from llamaduo.bus.topology import cancelled_bucket, durable_name, open_bucket, stream_fields
from llamaduo.contracts.events import (
    PAYLOADS,
    TERMINAL_SUBJECTS,
    DeadLetter,
    Envelope,
    Subject,
    dead_letter_subject,
)
from llamaduo.errors import SpecError
from llamaduo.runtime import metrics
from llamaduo.settings import Settings

log = logging.getLogger("llamaduo.bus.broker")


@dataclass(frozen=True)
class Delivery:
    """Redelivery policy of one consumer."""

    max_deliver: int = 5
    ack_wait: float = 60.0
    backoff: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)

    def delay(self, attempt: int) -> float:
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)] if self.backoff else 0.0


class WorkReturned(Exception):
    """Raised by a handler that stops early because its service is shutting down (SIGTERM): the message
    goes back to JetStream at once, for another worker or the restarted service, which resumes it."""


class PermanentError(Exception):
    """Raised by a handler for work that can never succeed: dead-lettered at once, not retried.

    A :class:`~llamaduo.errors.SpecError` out of a handler is treated the same way (a spec, or user code it names,
    that cannot work does not start working on a redelivery)."""


def make_stream(settings: Settings) -> JStream:
    """The installation's stream as FastStream declares it (see :func:`llamaduo.bus.topology.stream_fields`)."""
    return JStream(**stream_fields(settings), declare=True)


def _deliveries(msg: Any) -> int:
    raw = getattr(msg, "raw_message", None)
    try:
        return int(raw.metadata.num_delivered)
    except Exception:  # the in-memory test broker has no JetStream metadata
        return 1


class Bus:
    """A service's connection: publishers and consumers over the installation's stream."""

    def __init__(self, settings: Settings, service: str, *, broker: NatsBroker | None = None) -> None:
        self.settings = settings
        self.service = service
        self.stream = make_stream(settings)
        self.broker = broker or NatsBroker(
            **broker_kwargs(settings),
            name=f"llamaduo-{service}",
            middlewares=[self._middleware()],
            log_level=logging.DEBUG,
            graceful_timeout=30.0,
        )
        self._publishers: dict[Subject, Any] = {}
        self._policies: dict[str, Delivery] = {}
        #: set when the service is asked to stop; long handlers check it and raise :class:`WorkReturned`
        self.stopping = threading.Event()
        #: migrations cancelled so far (watched from the KV bucket; see :mod:`llamaduo.bus.cancellation`)
        self.cancelled = CancelledMigrations(
            lambda: open_bucket(self.broker, settings, cancelled_bucket(settings)), service)
        for name in PAYLOADS:
            self.publisher(name)

    # ------------------------------------------------------------------------------ publishing

    def publisher(self, name: Subject) -> Any:
        """The (documented) publisher of ``name``; its schema is the typed envelope."""
        if name not in self._publishers:
            self._publishers[name] = self.broker.publisher(
                self.settings.subject(name),
                stream=self.stream,
                schema=Envelope[PAYLOADS[name]],  # type: ignore[index]
                title=f"{name}:publish",
            )
        return self._publishers[name]

    async def emit(self, env: Envelope) -> None:
        """Publish an envelope to JetStream, deduplicated by its event id. A non-terminal event of a cancelled
        migration is dropped (logged): nothing of it follows its terminal event."""
        if env.migration_id in self.cancelled and env.type not in TERMINAL_SUBJECTS:
            log.info("not emitted: migration cancelled", extra={
                "service": self.service, "subject": str(env.type), "migration_id": env.migration_id,
                "round": env.round})
            return
        await self.publisher(env.type).publish(
            env.to_bytes(), headers={"Nats-Msg-Id": env.event_id, "content-type": "application/json"}
        )
        log.debug("emitted", extra={"subject": str(env.type), "event_id": env.event_id,
                                    "migration_id": env.migration_id, "round": env.round})

    async def dead_letter(self, subject: str, body: bytes, reason: str, deliveries: int) -> None:
        """Publish what could not be processed to ``dlq.<subject>`` with the reason."""
        migration_id = None
        with contextlib.suppress(Exception):
            import json

            migration_id = json.loads(body).get("migration_id")
        letter = DeadLetter(
            subject=subject, reason=reason[:4000], deliveries=deliveries, service=self.service,
            body=body.decode("utf-8", "replace")[:100_000], migration_id=migration_id,
        )
        target = self.settings.subject(dead_letter_subject(self.settings.unprefixed(subject)))
        await self.broker.publish(letter.model_dump_json().encode(), target, stream=self.stream.name)
        metrics.dead_lettered(self.settings.unprefixed(subject))
        log.warning("dead-lettered", extra={"subject": subject, "reason": reason[:300], "deliveries": deliveries})

    # ------------------------------------------------------------------------------ consuming

    def consumer(
        self,
        name: Subject | str,
        durable: str,
        delivery: Delivery = Delivery(),
        *,
        title: str | None = None,
        max_workers: int = 1,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
        """Decorator: a durable pull consumer on ``name``. Handlers sharing ``durable`` share the work."""
        full = self.settings.subject(name)
        if self.settings.ack_wait_seconds:
            delivery = replace(delivery, ack_wait=self.settings.ack_wait_seconds)
        self._policies[full] = delivery
        metrics.declare_subject(self.settings.unprefixed(full))
        return self.broker.subscriber(
            full,
            stream=self.stream,
            durable=durable_name(self.settings, durable),
            pull_sub=PullSub(batch_size=1, timeout=1.0),
            config=ConsumerConfig(
                max_deliver=delivery.max_deliver + 1,  # the last one is ours, to dead-letter it
                ack_wait=delivery.ack_wait,
            ),
            ack_policy=AckPolicy.MANUAL,
            max_workers=max_workers,
            title=title or f"{name}:{durable}",
        )

    def _middleware(self) -> type[BaseMiddleware]:
        bus = self

        class ReliableConsume(BaseMiddleware):
            async def consume_scope(self, call_next: Any, msg: Any) -> Any:
                subject = getattr(msg.raw_message, "subject", "") or ""
                policy = bus._policies.get(subject, Delivery())
                attempt = _deliveries(msg)
                name = bus.settings.unprefixed(subject)  # the metrics' label: bounded, the same in every installation
                await bus.cancelled.start()
                # the command that ends a cancelled migration must reach the controller even after a crash
                # between marking it cancelled and publishing its terminal event
                if bus.cancelled.covers(msg.body) and bus.settings.unprefixed(subject) != Subject.MIGRATION_CANCEL:
                    log.info("skipped: migration cancelled", extra={
                        "service": bus.service, "subject": subject, "migration_id": migration_of(msg.body)})
                    await msg.ack()
                    metrics.delivered(name, "skipped", attempt)
                    return None
                heartbeat = asyncio.create_task(_keep_alive(msg, policy.ack_wait))
                try:
                    with metrics.working(name):
                        result = await _cancellable(call_next, msg, bus.cancelled)
                except MigrationCancelled as err:
                    log.info("work stopped: migration cancelled", extra={
                        "service": bus.service, "subject": subject, "migration_id": migration_of(msg.body),
                        "why": str(err)[:300]})
                    await msg.ack()
                    metrics.delivered(name, "skipped", attempt)
                    return None
                except ValidationError as err:
                    await bus.dead_letter(subject, msg.body, f"schema: {_short(err)}", attempt)
                    await msg.reject()
                    metrics.delivered(name, "dead-lettered", attempt)
                    return None
                except WorkReturned as err:
                    log.info("in-flight work returned for redelivery",
                             extra={"subject": subject, "attempt": attempt, "why": str(err)})
                    await msg.nack()
                    metrics.delivered(name, "returned", attempt)
                    return None
                except (PermanentError, SpecError) as err:  # a spec that cannot work stays so: no retries
                    await bus.dead_letter(subject, msg.body, f"permanent: {err}", attempt)
                    await msg.reject()
                    metrics.delivered(name, "dead-lettered", attempt)
                    return None
                except Exception as err:
                    if attempt >= policy.max_deliver:
                        await bus.dead_letter(subject, msg.body, f"error after {attempt} deliveries: "
                                              f"{type(err).__name__}: {err}", attempt)
                        await msg.reject()
                        metrics.delivered(name, "dead-lettered", attempt)
                    else:
                        log.warning("handler failed; will retry", exc_info=True,
                                    extra={"subject": subject, "attempt": attempt})
                        await msg.nack(delay=policy.delay(attempt))
                        metrics.delivered(name, "retried", attempt)
                    return None
                finally:
                    heartbeat.cancel()
                await msg.ack()
                metrics.delivered(name, "ok", attempt)
                return result

        return ReliableConsume


async def _cancellable(call_next: Any, msg: Any, cancelled: CancelledMigrations) -> Any:
    """Run the handler; any failure of a migration cancelled meanwhile becomes :class:`MigrationCancelled`
    (its work is thrown away: no retry, no dead letter)."""
    try:
        return await call_next(msg)
    except (MigrationCancelled, ValidationError):
        raise
    except Exception as err:
        if cancelled.covers(msg.body):
            raise MigrationCancelled(f"{type(err).__name__}: {err}") from err
        raise


async def _keep_alive(msg: Any, ack_wait: float) -> None:
    """Tell JetStream the message is still being worked on, so long jobs are not redelivered."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(max(ack_wait / 3, 0.5))
            with contextlib.suppress(Exception):
                await msg.in_progress()


def _short(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:10])


