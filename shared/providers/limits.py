"""Rate limits and retries for network providers.

* :class:`TokenBucket` / :class:`RateLimiter`: async token buckets for requests per minute and tokens per
  minute (``ProviderSpec.limits``; ``None`` means unlimited) plus a concurrency cap.
* :func:`call_with_retries`: exponential backoff with jitter on retryable failures (429, 408/409, 5xx,
  timeouts, connection errors), honouring ``Retry-After`` / ``retry-after-ms`` (seconds or an HTTP date),
  at most ``ProviderSpec.max_retries`` retries, each attempt bounded by ``ProviderSpec.timeout_seconds``.

The clock, the sleep function and the random source are injectable, so tests run fast and deterministic.
Nothing here ever formats a secret: :func:`redact` scrubs given secret values (and key-like strings) from
every message that goes into a :class:`~llamaduo.providers.base.ProviderError`.
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
from typing import Any, TypeVar

from llamaduo.contracts.spec import ProviderSpec, RateLimits
from llamaduo.providers.base import ProviderError

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: HTTP statuses worth asking again (rate limit, request timeout, conflict, server side).
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})


def is_retryable_status(status: int | None) -> bool:
    """True for 408/409/425/429 and every 5xx."""
    return status is not None and (status in RETRYABLE_STATUSES or 500 <= status <= 599)


# ------------------------------------------------------------------------------------------ buckets


class TokenBucket:
    """A bucket refilled at ``rate_per_minute``, holding at most ``capacity`` units.

    :meth:`acquire` waits until the bucket holds ``min(amount, capacity)`` units and then takes ``amount``
    (the level may go negative: a request larger than the bucket is let through when the bucket is full
    and later callers pay its debt), so the long-run rate never exceeds ``rate_per_minute``. Waiters are
    served first come, first served. The default capacity is one second of allowance (at least 1), which
    spaces requests evenly instead of letting a whole minute's worth through at once.
    """

    def __init__(
        self,
        rate_per_minute: float,
        capacity: float | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be positive")
        self.rate = rate_per_minute / 60.0  # units per second
        self.capacity = float(capacity) if capacity is not None else max(1.0, self.rate)
        if self.capacity <= 0:
            raise ValueError("capacity must be positive")
        self._clock = clock or time.monotonic
        self._sleep = sleep or asyncio.sleep
        self._level = self.capacity
        self._stamp = self._clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._level = min(self.capacity, self._level + elapsed * self.rate)

    @property
    def level(self) -> float:
        """Units available now (negative while a large request's debt is being paid)."""
        self._refill()
        return self._level

    async def acquire(self, amount: float = 1.0) -> float:
        """Take ``amount`` units, waiting as needed; return the seconds waited."""
        if amount <= 0:
            return 0.0
        waited = 0.0
        async with self._lock:
            need = min(float(amount), self.capacity)
            while True:
                self._refill()
                if self._level >= need - 1e-9:
                    self._level -= amount
                    return waited
                delay = (need - self._level) / self.rate
                await self._sleep(delay)
                waited += delay

    def give_back(self, amount: float) -> None:
        """Return ``amount`` units (negative: take more), e.g. after a reservation proved too large."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets plus a concurrency cap, from :class:`RateLimits`.

    Requests are spaced evenly (``request_burst`` 1: one every ``60 / requests_per_minute`` seconds); the
    token bucket holds one second of allowance unless ``token_burst`` says otherwise.
    Call :meth:`acquire` with an estimate of the request's tokens before each HTTP attempt and
    :meth:`settle` with the real count afterwards (the difference goes back into, or comes out of, the
    token bucket). Hold :meth:`slot` around the attempt to bound concurrency.
    """

    def __init__(
        self,
        limits: RateLimits | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        request_burst: float = 1.0,
        token_burst: float | None = None,
    ) -> None:
        limits = limits or RateLimits()
        self.limits = limits
        self.requests = (
            TokenBucket(limits.requests_per_minute, request_burst, clock=clock, sleep=sleep)
            if limits.requests_per_minute
            else None
        )
        self.tokens = (
            TokenBucket(limits.tokens_per_minute, token_burst, clock=clock, sleep=sleep)
            if limits.tokens_per_minute
            else None
        )
        self._semaphore = asyncio.Semaphore(limits.max_concurrency)

    @property
    def unlimited(self) -> bool:
        return self.requests is None and self.tokens is None

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for one request and ``tokens`` tokens of allowance; return the seconds waited."""
        waited = 0.0
        if self.requests is not None:
            waited += await self.requests.acquire(1)
        if self.tokens is not None and tokens > 0:
            waited += await self.tokens.acquire(tokens)
        if waited > 0:
            log.debug("rate limit: waited %.2f s", waited)
        return waited

    def settle(self, reserved: int, used: int) -> None:
        """Correct the token bucket once the real token count of a request is known."""
        if self.tokens is not None and reserved != used:
            self.tokens.give_back(reserved - used)

    def slot(self) -> asyncio.Semaphore:
        """``async with limiter.slot():`` bounds concurrent attempts to ``max_concurrency``."""
        return self._semaphore


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
    limiter: RateLimiter | None = None,
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
    ``describe``, the failure and the attempt count, secrets redacted.
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


async def _timed(attempt: Callable[[], Awaitable[T]], timeout: float | None) -> T:
    if timeout is None:
        return await attempt()
    async with asyncio.timeout(timeout):
        return await attempt()


# ------------------------------------------------------------------------------------------ per provider


class CallGuard:
    """Everything a network provider wraps around one HTTP call: the rate limiter of its spec, the retry
    policy, and the secrets to keep out of messages. Clock, sleep and random source are injectable."""

    def __init__(
        self,
        spec: ProviderSpec,
        *,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.spec = spec
        self.policy = policy or RetryPolicy.from_spec(spec)
        self.limiter = RateLimiter(spec.limits, clock=clock, sleep=sleep)
        self.sleep = sleep or asyncio.sleep
        self.rng = rng
        self.secrets = tuple(s for s in secrets if s)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        classify: Callable[[BaseException], Failure | None],
        describe: str,
        tokens: int = 0,
    ) -> T:
        """:func:`call_with_retries` with this guard's limiter, policy, sleep, random source and secrets."""
        return await call_with_retries(
            attempt,
            policy=self.policy,
            classify=classify,
            describe=describe,
            limiter=self.limiter,
            tokens=tokens,
            sleep=self.sleep,
            rng=self.rng,
            secrets=self.secrets,
        )

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)
