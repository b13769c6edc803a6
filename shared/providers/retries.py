"""Retries of network-provider calls: exponential backoff with jitter on retryable failures (429,
408/409/425, 5xx, timeouts, connection errors), honouring ``Retry-After`` / ``retry-after-ms`` (seconds or
an HTTP date), at most ``ProviderSpec.max_retries`` retries, each attempt bounded by
``ProviderSpec.timeout_seconds``.

:func:`call_with_retries` acquires a rate limiter (any :class:`~llamaduo.providers.limits.Limiter`: the
in-process one, or the one held in NATS and shared by all replicas,
:mod:`llamaduo.providers.shared_limits`) before each attempt, and tells it about a 429 so that every caller
of that limiter slows down, not only the one that got it.

The sleep function and the random source are injectable, so tests run fast and deterministic. Nothing here
ever formats a secret: :func:`redact` scrubs given secret values (and key-like strings) from every message
that goes into a :class:`~llamaduo.providers.base.ProviderError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

from llamaduo.contracts.spec import ProviderSpec
from llamaduo.providers.base import ProviderError

if TYPE_CHECKING:
    from llamaduo.providers.limits import Limiter

log = logging.getLogger("llamaduo.providers.limits")

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: HTTP statuses worth asking again (rate limit, request timeout, conflict, server side).
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})


def is_retryable_status(status: int | None) -> bool:
    """True for 408/409/425/429 and every 5xx."""
    return status is not None and (status in RETRYABLE_STATUSES or 500 <= status <= 599)



# ------------------------------------------------------------------------------------------ retries


@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`call_with_retries` retries.

    The wait before retry ``n`` (0-based) is ``min(max_delay, base_delay * 2**n)``, stretched by a random
    factor in ``[1, 1 + jitter]``. A server's ``Retry-After`` replaces that: the wait is at least what the
    server asked (plus up to 10 % jitter, at most 1 s); a server asking for more than ``max_retry_after``
    seconds ends the call at once (a retryable :class:`ProviderError`), since waiting that long inside one
    call would stall the caller.
    """

    max_retries: int = 4
    timeout: float | None = 60.0
    base_delay: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 120.0

    @classmethod
    def from_spec(cls, spec: ProviderSpec, **overrides: Any) -> RetryPolicy:
        """The policy of ``spec`` (``max_retries``, ``timeout_seconds``), with optional overrides."""
        values: dict[str, Any] = {"max_retries": spec.max_retries, "timeout": spec.timeout_seconds}
        values.update(overrides)
        return cls(**values)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based) when the server gave no Retry-After."""
        base = min(self.max_delay, self.base_delay * (2**retry))
        r = (rng or random).random()
        return base * (1.0 + self.jitter * r)


@dataclass
class Failure:
    """A classified failure of one attempt."""

    message: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None


def parse_retry_after(headers: Mapping[str, str] | Any | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date).

    ``now`` is the wall-clock time (``time.time()``) used for HTTP dates. Returns None when absent or
    unreadable; never negative.
    """
    if headers is None:
        return None
    try:
        getter = headers.get
    except AttributeError:
        return None
    lowered: dict[str, str] | None = None

    def get(name: str) -> str | None:
        nonlocal lowered
        value = getter(name)
        if value is None:
            if lowered is None:
                try:
                    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
                except Exception:
                    lowered = {}
            value = lowered.get(name.lower())
        return None if value is None else str(value).strip()

    ms = get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*.]{6,}|AIza[0-9A-Za-z_\-]{20,})")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every given secret value and anything shaped like an API key replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    classify: Callable[[BaseException], Failure | None],
    describe: str,
    limiter: Limiter | None = None,
    tokens: int = 0,
    sleep: Sleep | None = None,
    rng: random.Random | None = None,
    secrets: Iterable[str | None] = (),
) -> T:
    """Run ``attempt`` until it succeeds, at most ``policy.max_retries + 1`` times.

    Before each attempt the ``limiter`` (if any) is acquired for one request and ``tokens`` tokens, outside
    the timeout. Each attempt runs under ``policy.timeout`` seconds. An exception is turned into a
    :class:`Failure` by ``classify`` (``None``: not ours, re-raised unchanged; a timeout of the attempt is
    classified here). A non-retryable failure, or the last one, raises :class:`ProviderError` with
    ``describe``, the failure and the attempt count, secrets redacted. A 429 pauses the ``limiter`` for the
    server's ``Retry-After`` (at most ``policy.max_retry_after``; without one, the plain backoff), so every
    caller sharing it waits, not only this one.
    """
    sleep = sleep or asyncio.sleep
    secrets = tuple(secrets)
    attempts = policy.max_retries + 1
    for number in range(attempts):
        if limiter is not None:
            await limiter.acquire(tokens)
        try:
            if limiter is not None:
                async with limiter.slot():
                    return await _timed(attempt, policy.timeout)
            return await _timed(attempt, policy.timeout)
        except ProviderError as err:
            failure = Failure(str(err), retryable=err.retryable)
        except TimeoutError:
            failure = Failure(f"timed out after {policy.timeout:g} s", retryable=True)
        except Exception as err:
            classified = classify(err)
            if classified is None:
                raise
            failure = classified
        if limiter is not None and failure.status == 429:
            await _pause(limiter, failure, policy, number)
        last = number == attempts - 1
        if not failure.retryable or last:
            tries = f"{number + 1} attempt{'s' if number else ''}"
            raise ProviderError(
                redact(f"{describe}: {failure.message} (gave up after {tries})", secrets),
                retryable=failure.retryable,
            )
        if failure.retry_after is not None:
            if failure.retry_after > policy.max_retry_after:
                raise ProviderError(
                    redact(
                        f"{describe}: {failure.message}; the server asks to wait {failure.retry_after:.0f} s, "
                        f"more than the {policy.max_retry_after:g} s allowed within one call",
                        secrets,
                    ),
                    retryable=True,
                )
            extra = min(1.0, 0.1 * failure.retry_after) * (rng or random).random()
            delay = failure.retry_after + extra
        else:
            delay = policy.backoff(number, rng)
        note = f"{describe}: {failure.message}; retry {number + 1}/{policy.max_retries} in {delay:.2f} s"
        log.info("%s", redact(note, secrets))
        await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def _pause(limiter: Limiter, failure: Failure, policy: RetryPolicy, number: int) -> None:
    """Tell ``limiter`` that the provider asked to slow down (never fails the call itself)."""
    if failure.retry_after is not None:
        seconds = min(failure.retry_after, policy.max_retry_after)
    else:
        seconds = min(policy.max_delay, policy.base_delay * (2**number))
    try:
        await limiter.pause(seconds)
    except ProviderError as err:
        log.warning("could not share a 429 pause of %.1f s: %s", seconds, err)


async def _timed(attempt: Callable[[], Awaitable[T]], timeout: float | None) -> T:
    if timeout is None:
        return await attempt()
    async with asyncio.timeout(timeout):
        return await attempt()
