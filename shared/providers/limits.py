"""Rate limits of network providers, in this process.

* :class:`TokenBucket` / :class:`RateLimiter`: async token buckets for requests per minute and tokens per
  minute (``ProviderSpec.limits``; ``None`` means unlimited) plus a concurrency cap.
* :class:`Limiter`: what a provider's :class:`CallGuard` needs of a limiter. :class:`RateLimiter` is the
  in-process one (the CLI, embedded tests, anything without a bus); the services inject
  :class:`~llamaduo.providers.shared_limits.SharedRateLimiter`, held in NATS and shared by every replica.
* :class:`CallGuard`: the limiter, the retry policy (:mod:`llamaduo.providers.retries`) and the secrets
  of one provider.

The retry names (:func:`call_with_retries`, :class:`RetryPolicy`, :class:`Failure`, ...) are re-exported
from :mod:`llamaduo.providers.retries`, so ``from llamaduo.providers.limits import RetryPolicy`` keeps working.
The clock, the sleep function and the random source are injectable, so tests run fast and deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from llamaduo.contracts.spec import ProviderSpec, RateLimits
from llamaduo.providers.retries import (
    RETRYABLE_STATUSES,
    Clock,
    Failure,
    RetryPolicy,
    Sleep,
    call_with_retries,
    is_retryable_status,
    parse_retry_after,
    redact,
)

__all__ = [
    "RETRYABLE_STATUSES", "CallGuard", "Clock", "Failure", "Limiter", "RateLimiter", "RetryPolicy", "Sleep",
    "TokenBucket", "call_with_retries", "is_retryable_status", "parse_retry_after", "redact",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Limiter(Protocol):
    """What :func:`call_with_retries` and the providers need of a rate limiter."""

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for one request and ``tokens`` tokens of allowance; return the seconds waited."""

    async def settle(self, reserved: int, used: int) -> None:
        """Correct the token allowance once the real token count of a request is known."""

    async def pause(self, seconds: float) -> None:
        """The provider asked to slow down (a 429): let no request start for ``seconds``."""

    def slot(self) -> AbstractAsyncContextManager[object]:
        """``async with limiter.slot():`` around one attempt bounds concurrent attempts."""


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
    token bucket). Hold :meth:`slot` around the attempt to bound concurrency. :meth:`pause` (a 429) holds
    back every later :meth:`acquire` of this limiter. Everything stays in this process: replicas each have
    their own (see :mod:`llamaduo.providers.shared_limits` for the shared one).
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
        self._clock = clock or time.monotonic
        self._sleep = sleep or asyncio.sleep
        self._paused_until = float("-inf")

    @property
    def unlimited(self) -> bool:
        return self.requests is None and self.tokens is None

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for one request and ``tokens`` tokens of allowance; return the seconds waited."""
        waited = 0.0
        while (pause := self._paused_until - self._clock()) > 0:
            await self._sleep(pause)
            waited += pause
        if self.requests is not None:
            waited += await self.requests.acquire(1)
        if self.tokens is not None and tokens > 0:
            waited += await self.tokens.acquire(tokens)
        if waited > 0:
            log.debug("rate limit: waited %.2f s", waited)
        return waited

    async def settle(self, reserved: int, used: int) -> None:
        """Correct the token bucket once the real token count of a request is known."""
        if self.tokens is not None and reserved != used:
            self.tokens.give_back(reserved - used)

    async def pause(self, seconds: float) -> None:
        """Let no request of this limiter start for ``seconds`` (a 429's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def slot(self) -> asyncio.Semaphore:
        """``async with limiter.slot():`` bounds concurrent attempts to ``max_concurrency``."""
        return self._semaphore


# ------------------------------------------------------------------------------------------ per provider


class CallGuard:
    """Everything a network provider wraps around one HTTP call: the rate limiter of its spec, the retry
    policy, and the secrets to keep out of messages. Clock, sleep and random source are injectable.

    ``limiter`` replaces the in-process :class:`RateLimiter` built from ``spec.limits`` (the services pass
    the one shared by all replicas, :class:`~llamaduo.providers.shared_limits.SharedRateLimiter`)."""

    def __init__(
        self,
        spec: ProviderSpec,
        *,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        secrets: Iterable[str | None] = (),
        limiter: Limiter | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy or RetryPolicy.from_spec(spec)
        self.limiter: Limiter = limiter or RateLimiter(spec.limits, clock=clock, sleep=sleep)
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
