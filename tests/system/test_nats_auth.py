"""NATS authentication from settings against real nats-servers: token, NKey seed file, JWT .creds file.

The keys, the JWTs and the creds file are made here (ed25519 via ``nkeys``/PyNaCl), like ``nsc`` would: an
operator signs an account (with JetStream limits), the account signs a user; the server runs in operator
mode with the account JWTs preloaded. A wrong key or token is refused with a clear message that holds no
secret.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import nkeys
import pytest
from nacl.signing import SigningKey
from support.bus import carries_an_event

from llamaduo.bus.connection import connect
from llamaduo.runtime.local_servers import NatsServer
from llamaduo.settings import Settings

TOKEN = "t0ken-that-must-not-leak"


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(SigningKey.generate().encode(), prefix))


def seed_of(kp: nkeys.KeyPair) -> str:
    return kp.seed.decode()


def pub(kp: nkeys.KeyPair) -> str:
    return kp.public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict) -> str:
    """A NATS v2 JWT signed by ``issuer``."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {"jti": _b64(os.urandom(16)), "iat": int(time.time()), "iss": pub(issuer), "name": name,
              "sub": subject, "nats": {**nats, "version": 2}}
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(issuer.sign(f'{header}.{body}'.encode()))}"


async def test_token(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", extra_args=["--auth", TOKEN]).start()
    try:
        assert await carries_an_event(Settings(nats_url=server.url, nats_token=TOKEN)) == [7]
        with pytest.raises(ConnectionError) as err:
            await connect(Settings(nats_url=server.url, nats_token="not-the-token"))
        assert "authorization" in str(err.value).lower() and "not-the-token" not in str(err.value)
    finally:
        server.stop()


async def test_nkey_seed_file(tmp_path: Path) -> None:
    user = new_key(nkeys.PREFIX_BYTE_USER)
    config = tmp_path / "nkey.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{pub(user)}" }} ] }}\n')
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed_of(user) + "\n")
    stranger = tmp_path / "stranger.nk"
    stranger.write_text(seed_of(new_key(nkeys.PREFIX_BYTE_USER)) + "\n")
    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(config)]).start()
    try:
        assert await carries_an_event(Settings(nats_url=server.url, nats_nkey_seed_file=seed_file)) == [7]
        with pytest.raises(ConnectionError) as err:
            await connect(Settings(nats_url=server.url, nats_nkey_seed_file=stranger))
        assert "authorization" in str(err.value).lower() and seed_of(user) not in str(err.value)
    finally:
        server.stop()


def write_creds(path: Path, user_jwt: str, user: nkeys.KeyPair) -> None:
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed_of(user)}\n------END USER NKEY SEED------\n"
    )


async def test_creds_file_in_operator_mode(tmp_path: Path) -> None:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    system, account = new_key(nkeys.PREFIX_BYTE_ACCOUNT), new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = jwt(operator, pub(operator), "op", {"type": "operator"})
    system_jwt = jwt(operator, pub(system), "SYS", {"type": "account", "limits": unlimited})
    account_jwt = jwt(operator, pub(account), "app",
                      {"type": "account", "limits": {**unlimited, **jetstream}})
    user = new_key(nkeys.PREFIX_BYTE_USER)
    user_jwt = jwt(account, pub(user), "svc", {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1,
                                                 "payload": -1})
    config = tmp_path / "operator.conf"
    config.write_text(
        f"operator: {operator_jwt}\nsystem_account: {pub(system)}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {pub(system)}: {system_jwt}\n  {pub(account)}: {account_jwt}\n}}\n"
    )
    creds = tmp_path / "svc.creds"
    write_creds(creds, user_jwt, user)
    # a user signed by an account the server does not know
    rogue_account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    rogue = new_key(nkeys.PREFIX_BYTE_USER)
    rogue_creds = tmp_path / "rogue.creds"
    write_creds(rogue_creds, jwt(rogue_account, pub(rogue), "rogue", {"type": "user"}), rogue)

    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(config)]).start()
    try:
        assert await carries_an_event(Settings(nats_url=server.url, nats_creds_file=creds)) == [7]
        with pytest.raises(ConnectionError) as err:
            await connect(Settings(nats_url=server.url, nats_creds_file=rogue_creds))
        assert "authorization" in str(err.value).lower() and seed_of(rogue) not in str(err.value)
    finally:
        server.stop()
