"""Connecting to NATS: server URLs, credentials (user/password, token, NKey seed, JWT .creds) and TLS,
for FastStream's broker and for plain nats-py clients alike. Errors name the server, never a credential."""

from __future__ import annotations

import asyncio
from typing import Any

from llamaduo.errors import BusError
from llamaduo.settings import Settings


def _tls_context(settings: Settings) -> Any:
    if not (settings.nats_tls_ca_file or settings.nats_tls_cert_file):
        return None
    import ssl

    ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None)
    if settings.nats_tls_cert_file and settings.nats_tls_key_file:
        ctx.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file))
    return ctx


def nats_connect_kwargs(settings: Settings) -> dict[str, Any]:
    """Arguments for ``nats.connect`` from settings (user/password, token, creds, nkey, TLS)."""
    kwargs: dict[str, Any] = {"servers": [s.strip() for s in settings.nats_url.split(",") if s.strip()]}
    if settings.nats_user:
        kwargs["user"] = settings.nats_user
        kwargs["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    if settings.nats_token:
        kwargs["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds_file:
        kwargs["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_nkey_seed_file:
        kwargs["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if (tls := _tls_context(settings)) is not None:
        kwargs["tls"] = tls
    return kwargs


def broker_kwargs(settings: Settings) -> dict[str, Any]:
    """The same settings as FastStream ``NatsBroker`` arguments (its security objects)."""
    from faststream.nats import NatsCredentials, NatsNKey, NatsToken, NatsUserPassword
    from faststream.nats.security import NatsSecurity

    tls = _tls_context(settings)
    common = {"ssl_context": tls, "use_ssl": tls is not None}
    security: NatsSecurity | None
    if settings.nats_user:
        pw = settings.nats_password.get_secret_value() if settings.nats_password else ""
        security = NatsUserPassword(settings.nats_user, pw, **common)
    elif settings.nats_token:
        security = NatsToken(settings.nats_token.get_secret_value(), **common)
    elif settings.nats_creds_file:
        security = NatsCredentials.from_file(str(settings.nats_creds_file), **common)
    elif settings.nats_nkey_seed_file:
        security = NatsNKey(str(settings.nats_nkey_seed_file), **common)
    else:
        security = NatsSecurity(**common) if tls is not None else None
    return {"servers": nats_connect_kwargs(settings)["servers"], "security": security}


async def connect(settings: Settings) -> Any:
    """A nats-py connection (``nats.aio.client.Client``).

    Failure raises :class:`~llamaduo.errors.BusError` (a ``ConnectionError``) naming the server and the first
    cause (e.g. an authorization violation), never a credential.
    """
    import nats

    errors: list[BaseException] = []

    async def record(err: BaseException) -> None:
        errors.append(err)

    try:
        return await asyncio.wait_for(
            nats.connect(**nats_connect_kwargs(settings), connect_timeout=5, max_reconnect_attempts=3,
                         allow_reconnect=True, error_cb=record),
            timeout=10,
        )
    except Exception as err:  # nats-py raises several types; the message is what matters to a user
        cause = errors[0] if errors else err
        raise BusError(f"cannot connect to NATS at {settings.nats_url.split('@')[-1]}: "
                       f"{type(cause).__name__}: {cause}") from None
