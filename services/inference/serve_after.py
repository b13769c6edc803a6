"""Serving a completed migration's chosen model from the inference service (``migration.completed`` with the
spec's ``serve.enabled``), behind the OpenAI-compatible API of :mod:`llamaduo.serving`, as ``llamaduo serve
--migration`` would. Migrations asking for the same address share one server: a later one adds its model, or
replaces one of the same name. An address already in use is logged as an error and the service goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llamaduo.contracts.spec import MigrationSpec
from llamaduo.serving.guard import ServingLimits
from llamaduo.serving.migration import fetch_migration_model, migration_defaults
from llamaduo.serving.server import BackgroundServer
from llamaduo.settings import Settings
from llamaduo.storage.store import ArtifactStore

# the service's logger: these lines are the inference service's
log = logging.getLogger("llamaduo.inference")

#: Servers started after completions, by ``(host, port)`` as the specs ask for them.
Servers = dict[tuple[str, int], BackgroundServer]


def serve_completed(
    store: ArtifactStore, spec: MigrationSpec, migration_id: str, servers: Servers, cache: Path,
    *, model_key: str | None = None, model_sha256: str | None = None, limits: ServingLimits | None = None,
) -> BackgroundServer | None:
    """Serve a completed migration's chosen model as its spec's ``serve`` section asks (blocking: loads it).

    The model is fetched like ``llamaduo serve --migration`` does (``fetch_migration_model``;
    ``model_key``, ``model_sha256``: the completion event's model) into ``cache`` and verified to be the model
    that was judged (a :class:`~llamaduo.errors.StoreError` otherwise, before it is loaded), then published on
    the server of ``(serve.host, serve.port)`` in ``servers`` (started on first use). Returns that server; None
    when the spec does not ask, or when the address is taken (logged as an error: the service goes on).
    ``limits``: API keys, body and token caps, queue of a server started now (default: from the environment's
    ``LLAMADUO_API_KEYS``... as :meth:`ServingLimits.from_settings` reads them).
    """
    ask = spec.serve
    if not ask.enabled:
        return None
    name = ask.model_name or migration_id
    folder, _ = fetch_migration_model(store, migration_id, cache, model_key=model_key,
                                      model_sha256=model_sha256)
    server = servers.get((ask.host, ask.port))
    if server is None:
        limits = limits or ServingLimits.from_settings(Settings())
        server = servers[(ask.host, ask.port)] = BackgroundServer(ask.host, ask.port, limits=limits)
    try:
        replaced = server.publish({name: folder}, {name: migration_defaults(spec)})
    except OSError as err:
        log.error("cannot serve migration %s as %r on %s:%d: %s (is another server using that port? set "
                  "serve.port to a free one)", migration_id, name, ask.host, ask.port, err,
                  extra={"migration_id": migration_id})
        return None
    log.info("serving migration %s as %r on %s/v1%s", migration_id, name, server.url,
             " (replaced the model of that name)" if replaced else "", extra={"migration_id": migration_id})
    return server
