"""What stands in front of an OpenAI-compatible app: API keys, a body limit, a bounded queue of generations.

Plain ASGI middleware (no torch, no model code), shared by ``llamaduo serve``, the inference service's server and
the gateway. :func:`guard_app` wraps any ASGI app; :func:`guard_middleware` gives the same layers as Starlette
``Middleware`` entries (then ``app.state`` stays reachable). Outermost first:

* :class:`APIKeyAuth`: ``Authorization: Bearer <key>`` checked in constant time (``hmac.compare_digest``) against
  :attr:`ServingLimits.api_keys`; the admin paths (adapters loaded at run time) against
  :attr:`ServingLimits.admin_api_keys` when set, else the serving keys. No key configured: nothing is asked.
  ``/health`` stays open. 401 with an OpenAI error body; a key is never logged nor echoed.
* :class:`BodyLimit`: bodies over :attr:`ServingLimits.max_body_bytes` are 413 (read at most that much).
* :class:`BoundedQueue`: on the generation paths, at most ``max_concurrent`` requests run and ``max_waiting``
  wait; beyond, 429 with ``Retry-After``. A streamed answer holds its slot until its last byte.

:func:`check_token_budget` is the 400 for ``max_tokens`` x ``n`` over :attr:`ServingLimits.max_total_tokens`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from llamaduo.errors import SpecError
from llamaduo.serving.api import APIError

log = logging.getLogger(__name__)

ASGIApp = Any
Scope = dict[str, Any]

#: Paths of the run-time adapter endpoints (vLLM's names): admin keys when set.
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
#: Paths that generate: the bounded queue applies to them.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class ServingLimits(BaseModel):
    """What a served app accepts: keys, body size, generated tokens per request, generations at once."""

    model_config = ConfigDict(frozen=True)

    api_keys: tuple[SecretStr, ...] = Field(default=(), description="Bearer keys accepted; none: no key asked")
    admin_api_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Keys of the admin paths (adapters at run time); none: the serving keys"
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body; 413 beyond")
    max_total_tokens: int = Field(default=16384, gt=0, description="Cap on max_tokens x n; 400 beyond")
    max_concurrent: int = Field(default=4, gt=0, description="Generation requests running at once")
    max_waiting: int = Field(default=16, ge=0, description="Generation requests waiting; 429 beyond")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (seconds) of a 429")
    open_paths: tuple[str, ...] = ("/health",)
    admin_paths: tuple[str, ...] = ADMIN_PATHS
    queued_paths: tuple[str, ...] = GENERATION_PATHS

    @classmethod
    def from_settings(
        cls, settings: Any, *, api_keys_file: Path | str | None = None, **overrides: Any
    ) -> ServingLimits:
        """Limits from :class:`~llamaduo.settings.Settings` (``LLAMADUO_API_KEYS``, ``LLAMADUO_API_KEYS_FILE``,
        ``LLAMADUO_ADMIN_API_KEYS``, ``LLAMADUO_SERVE_*``), plus the keys of ``api_keys_file``; ``overrides``
        (fields of this class, None ones ignored) come last."""
        keys = [k.get_secret_value() for k in settings.api_keys]
        for path in (settings.api_keys_file, api_keys_file):
            if path is not None:
                keys.extend(read_api_keys_file(path))
        fields: dict[str, Any] = {
            "api_keys": tuple(SecretStr(k) for k in dict.fromkeys(keys)),
            "admin_api_keys": tuple(settings.admin_api_keys),
            "max_body_bytes": settings.serve_max_body_bytes,
            "max_total_tokens": settings.serve_max_total_tokens,
            "max_concurrent": settings.serve_max_concurrent,
            "max_waiting": settings.serve_max_waiting,
        }
        fields.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**fields)


def read_api_keys_file(path: Path | str) -> list[str]:
    """The keys of a keys file: one a line; blank lines and ``#`` comments skipped. :class:`SpecError` when it
    cannot be read or holds no key."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SpecError(f"API keys file {path}: cannot be read ({err.strerror}); give a readable file with one "
                        "key a line (LLAMADUO_API_KEYS_FILE or --api-keys-file)") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise SpecError(f"API keys file {path}: holds no key; put one key a line")
    return keys


def check_token_budget(max_tokens: int, n: int, limits: ServingLimits) -> None:
    """A 400 :class:`APIError` naming ``max_tokens`` and ``n`` when ``max_tokens * n`` is over the cap."""
    if max_tokens * n > limits.max_total_tokens:
        raise APIError(
            400,
            f"max_tokens ({max_tokens}) x n ({n}) = {max_tokens * n} is over this server's cap of "
            f"{limits.max_total_tokens} generated tokens per request; lower max_tokens or n",
            param="max_tokens",
            code="max_tokens_exceeded",
        )


async def send_error(send: Any, err: APIError, headers: dict[str, str] | None = None) -> None:
    """Answer ``err`` as an OpenAI error body (raw ASGI: works under any framework)."""
    import json

    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def _matches(token: bytes, keys: Iterable[bytes]) -> bool:
    found = False
    for key in keys:  # every key compared, each in constant time
        found |= hmac.compare_digest(token, key)
    return found


class APIKeyAuth:
    """ASGI middleware: bearer keys (see the module docstring). Keys are given as plain strings or SecretStr."""

    def __init__(
        self, app: ASGIApp, *, api_keys: Iterable[str | SecretStr] = (), admin_api_keys: Iterable[str | SecretStr] = (),
        open_paths: Iterable[str] = ("/health",), admin_paths: Iterable[str] = ADMIN_PATHS,
    ) -> None:
        def raw(keys: Iterable[str | SecretStr]) -> tuple[bytes, ...]:
            return tuple((k.get_secret_value() if isinstance(k, SecretStr) else k).encode() for k in keys)

        self.app = app
        self._keys, self._admin_keys = raw(api_keys), raw(admin_api_keys)
        self.open_paths, self.admin_paths = frozenset(open_paths), frozenset(admin_paths)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.open_paths:
            return await self.app(scope, receive, send)
        admin = path in self.admin_paths
        accepted = (self._admin_keys or self._keys) if admin else self._keys + self._admin_keys
        if not accepted:
            return await self.app(scope, receive, send)
        token = _bearer(scope)
        if token is not None and _matches(token, accepted):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?",))[0]
        reason = "no bearer key" if token is None else ("a key that is not an admin key" if admin else "a wrong key")
        log.warning("refused %s %s from %s: %s", scope.get("method"), path, client, reason)
        message = (
            "Missing API key: send it as 'Authorization: Bearer <key>'" if token is None
            else "Incorrect API key provided" + (" for this admin endpoint" if admin else "")
        )
        await send_error(send, APIError(401, message, code="invalid_api_key"), {"www-authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 (the app sees a body at most that long)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is over this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await send_error(send, self._too_large())
        chunks: list[bytes] = []
        size = 0
        early: Any = None  # a disconnect before the body ended
        while True:  # read the body here, at most max_bytes of it, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                early = message
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await send_error(send, self._too_large())
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        pending = [early if early is not None else {"type": "http.request", "body": b"".join(chunks)}]

        async def replay() -> Any:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class BoundedQueue:
    """ASGI middleware: at most ``max_concurrent`` requests on ``paths`` run, ``max_waiting`` wait; beyond, 429.

    ``running`` and ``waiting`` say how many there are now.
    """

    def __init__(
        self, app: ASGIApp, *, max_concurrent: int, max_waiting: int, retry_after_s: int = 1,
        paths: Iterable[str] = GENERATION_PATHS,
    ) -> None:
        self.app, self.max_concurrent, self.max_waiting = app, max_concurrent, max_waiting
        self.retry_after_s, self.paths = retry_after_s, frozenset(paths)
        self.running = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        if self.running + self.waiting >= self.max_concurrent + self.max_waiting:
            log.warning("refused %s: %d generations running, %d waiting", scope.get("path"), self.running,
                        self.waiting)
            err = APIError(429, f"The server is busy ({self.running} requests running, {self.waiting} waiting); "
                           f"retry after {self.retry_after_s} s", type="rate_limit_error", code="server_busy")
            return await send_error(send, err, {"retry-after": str(self.retry_after_s)})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1
            self._slots.release()


def guard_middleware(limits: ServingLimits) -> list[Any]:
    """The guard's layers as Starlette ``Middleware`` entries (outermost first), for ``Starlette(middleware=...)``."""
    from starlette.middleware import Middleware

    return [
        Middleware(APIKeyAuth, api_keys=limits.api_keys, admin_api_keys=limits.admin_api_keys,
                   open_paths=limits.open_paths, admin_paths=limits.admin_paths),
        Middleware(BodyLimit, max_bytes=limits.max_body_bytes),
        Middleware(BoundedQueue, max_concurrent=limits.max_concurrent, max_waiting=limits.max_waiting,
                   retry_after_s=limits.retry_after_s, paths=limits.queued_paths),
    ]


def guard_app(app: ASGIApp, limits: ServingLimits) -> ASGIApp:
    """``app`` behind the guard's layers (an ASGI app: serve it instead of ``app``)."""
    for layer in reversed(guard_middleware(limits)):
        app = layer.cls(app, *layer.args, **layer.kwargs)
    return app
