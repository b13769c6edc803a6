"""What an installation declares on NATS, defined once for FastStream's broker and the nats-py client:
the stream (name, subjects, storage, duplicate window) and the durable names of consumers.

No FastStream import here, so plain clients stay light.
"""

from __future__ import annotations

from typing import Any

from nats.js.api import StorageType, StreamConfig

from llamaduo.contracts.events import DEAD_LETTER_FAMILY, SUBJECT_FAMILIES
from llamaduo.settings import Settings

#: How long JetStream remembers a Nats-Msg-Id (seconds): re-publishing within it is a no-op.
DUPLICATE_WINDOW = 24 * 3600

#: The durable of the controller's ``migration.start`` consumer: once it exists, the installation can
#: take a migration (:func:`llamaduo.bus.client.wait_ready` waits for it).
CONTROLLER_START = "controller-start"


def cancelled_bucket(settings: Settings) -> str:
    """The KV bucket of cancelled migrations (key: migration id, value: the cancel's JSON); the controller
    writes it, every service watches it (:mod:`llamaduo.bus.cancellation`)."""
    return f"{settings.stream_name}_CANCELLED"


def stream_subjects(settings: Settings) -> list[str]:
    """Every subject family of the installation, dead letters included, under its prefix."""
    return [settings.subject(f"{fam}.>") for fam in (*SUBJECT_FAMILIES, DEAD_LETTER_FAMILY)]


def stream_fields(settings: Settings) -> dict[str, Any]:
    """The stream's definition, as keyword arguments that both FastStream's ``JStream`` and nats-py's
    ``StreamConfig`` take."""
    return {
        "name": settings.stream_name,
        "description": "LlamaDuo events and requests",
        "subjects": stream_subjects(settings),
        "storage": StorageType.FILE,
        "duplicate_window": DUPLICATE_WINDOW,
        "num_replicas": settings.nats_replicas,  # consumers inherit it (R3 on a cluster: docs/cluster.md)
    }


def stream_config(settings: Settings) -> StreamConfig:
    """The stream's definition for a plain nats-py client (``js.add_stream``)."""
    return StreamConfig(**stream_fields(settings))


#: History kept per entry of the routes bucket: every process that opens it must declare the same (the route's own
#: versions are in ``RouteState.history``).
ROUTES_HISTORY = 1


def routes_bucket(stream_name: str) -> str:
    """KV bucket of the gateway's route states (one entry per route, key: the route name, value: a
    :class:`llamaduo.contracts.routes.RouteState` as JSON); every gateway replica watches it."""
    return f"{stream_name}_ROUTES"


def shadow_bucket(stream_name: str) -> str:
    """KV bucket of the gateway's shadow watch: one rolling window of judge scores per route and version (key
    ``<route>/<version>``, see :mod:`llamaduo.services.gateway.watch`), changed by compare-and-set."""
    return f"{stream_name}_SHADOW"


#: The durable of the judge's ``shadow.request`` consumer (its own, so live traffic never waits behind eval
#: batches), and of the gateway's ``shadow.scored`` consumer (shared by the replicas: each score counted once).
JUDGE_SHADOW = "judge-shadow"
GATEWAY_WATCH = "gateway-watch"

#: The durable of the inference service's ``infer.shard`` work queue: shared by every inference replica, so the
#: shards of one round are answered by all of them together (KEDA scales inference on its lag too).
INFERENCE_SHARD = "inference-shard"


async def open_bucket(conn: Any, settings: Settings, bucket: str, *, history: int = 1,
                      description: str | None = None) -> Any:
    """The KV bucket ``bucket`` (created when missing) with the installation's replica count
    (``LLAMADUO_NATS_REPLICAS``): every bucket of the installation is opened here.

    ``conn`` is a FastStream ``NatsBroker`` (the services' bus) or a nats-py ``JetStreamContext`` (plain
    clients: the CLI); every process that opens a bucket must declare the same ``history``."""
    from nats.js import JetStreamContext

    if isinstance(conn, JetStreamContext):
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BucketNotFoundError

        try:
            return await conn.key_value(bucket)
        except BucketNotFoundError:
            return await conn.create_key_value(KeyValueConfig(
                bucket=bucket, history=history, description=description, replicas=settings.nats_replicas))
    return await conn.key_value(bucket, history=history, description=description, replicas=settings.nats_replicas)


def rate_limit_bucket(settings: Settings) -> str:
    """KV bucket of the provider rate limits shared by every replica (one entry per provider account, see
    :mod:`llamaduo.providers.shared_limits`)."""
    return f"{settings.stream_name}_RATES"


def durable_name(settings: Settings, durable: str) -> str:
    """The JetStream durable name of consumer ``durable``: scoped to the installation's stream (so several
    installations can share one account), with no dots (JetStream forbids them in durable names)."""
    return f"{settings.stream_name}_{durable}".replace(".", "_")
