"""Rate limits shared by every replica of a service for one provider account, held in NATS.

``ProviderSpec.limits`` states what the provider *account* allows. With the in-process limiter
(:class:`~llamaduo.providers.limits.RateLimiter`) each replica spends that whole allowance on its own, so
``--scale judge=8`` would send eight times the configured requests per minute and get 429s back. The
services build their providers with :func:`make_shared_provider` instead, whose
:class:`SharedRateLimiter` keeps the account's schedule in one JetStream KV entry (bucket
``<stream>_RATES``, key :func:`account_key`) that every replica updates by compare-and-set.

Design: a *reserved schedule* (GCRA, the generic cell rate algorithm), not a level-and-poll token bucket and
not leased quota slices. The entry holds, in wall-clock seconds, when the next request may start at the
configured rate (``next_request``), the same for tokens (``next_token``) and until when a 429 asked
everyone to wait (``paused_until``). To acquire, a caller computes its start time from the entry, writes the
entry advanced by one request interval (and its tokens' interval) with the revision it read, and then sleeps
*locally* until its start. So:

* **NATS round trips per call**: one successful compare-and-set: a get and an update (2), or just the update
  (1) when this limiter wrote the entry last (it keeps the value and revision of its own write, and only
  reads again after a conflict). Waiting costs none (no polling of a level), however long the queue. A
  token estimate that proved wrong costs one more compare-and-set (:meth:`SharedRateLimiter.settle`);
  with only ``requests_per_minute`` there is none. Leased slices would save round trips only at rates far
  above what service LLM accounts allow, and would strand a killed worker's unused lease.
* **A killed worker leaks nothing**: no worker holds tokens or locks. What a killed worker reserved are
  start times; they simply pass (at worst the account idles for the slots it had queued). A caller cancelled
  while waiting forfeits its slot the same way: conservative, never above the limit.
* **Contention**: N workers racing for the entry lose the compare-and-set, read again and retry, sleeping a
  random (jittered) few milliseconds that grow with each conflict, at most ``max_conflicts`` times; then the
  call fails with a retryable :class:`~llamaduo.errors.ProviderError` (the caller's retries take over).
* **429s slow all replicas**: :func:`~llamaduo.providers.retries.call_with_retries` calls
  :meth:`SharedRateLimiter.pause` with the server's ``Retry-After``; every replica's next acquire starts
  after it. Requests already scheduled before the pause go ahead (they were within the rate).
* **Clocks**: the schedule is in wall-clock time (``time.time``), the only clock processes share. Replicas on
  one host agree exactly; across hosts NTP keeps the error to milliseconds, far below the spacing of
  service-LLM requests (a skewed host can move one request earlier by the skew, never more).
* **Bursts**: as in-process, requests are spaced evenly (burst 1: one every ``60 / requests_per_minute`` s)
  and the token allowance holds one second's worth; over any window of ``w`` seconds an account sees at most
  ``w * requests_per_minute / 60 + 1`` requests from all replicas together.

**Concurrency stays per process** (``limits.max_concurrency`` bounds each replica's attempts in flight).
Sharing it soundly needs a lease per call renewed while the call runs (Batch API calls wait for hours) and
expiring when a worker is killed: two more writes per call plus a renewal loop, for a limit providers do
not enforce per account (they limit requests and tokens per minute, which are shared here).

The account key names the provider, its base URL, the *name* of the environment variable holding the key and
the model (OpenAI and Gemini limit per model), hashed: never the key's value. The CLI and the embedded tests
have no bus and keep the in-process limiter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from llamaduo.bus.kv_cell import KVCell
from llamaduo.contracts.spec import ProviderSpec, RateLimits, TaskSpec
from llamaduo.providers.base import Provider, make_provider
from llamaduo.providers.retries import Clock, Sleep

log = logging.getLogger(__name__)


#: Providers whose limits belong to an account reached over the network (shared by all replicas). A
#: ``local`` model runs in each replica, so its limits stay per process; ``simulated`` has none.
SHARED_PROVIDERS = frozenset({"openai", "openai-compatible", "gemini"})
#: Where a provider without ``base_url`` sends its calls, and the key variables it reads by default.
DEFAULT_ENDPOINTS = {"openai": "https://api.openai.com/v1", "gemini": "https://generativelanguage.googleapis.com"}
DEFAULT_KEY_ENVS = {"openai": "OPENAI_API_KEY", "openai-compatible": "OPENAI_API_KEY",
                    "gemini": "GEMINI_API_KEY|GOOGLE_API_KEY"}


def account_key(spec: ProviderSpec) -> str:
    """The KV key of ``spec``'s provider account: a hash of provider, base URL, key variable *name* and model
    (never the key's value), valid as a JetStream KV key."""
    identity = [
        spec.provider,
        (spec.base_url or DEFAULT_ENDPOINTS.get(spec.provider, "")).rstrip("/"),
        spec.api_key_env or DEFAULT_KEY_ENVS.get(spec.provider, ""),
        spec.model,
    ]
    return "acct-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:40]


# ------------------------------------------------------------------------------------------ the schedule


@dataclass(frozen=True)
class RateState:
    """An account's schedule (wall-clock seconds): when the next request / token may start at the rate,
    and until when a 429 asked every replica to wait."""

    next_request: float = 0.0
    next_token: float = 0.0
    paused_until: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps({"next_request": self.next_request, "next_token": self.next_token,
                           "paused_until": self.paused_until}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RateState:
        """The state in ``data``; an unreadable entry counts as a fresh (idle) account."""
        try:
            raw = json.loads(data)
            return cls(float(raw.get("next_request", 0)), float(raw.get("next_token", 0)),
                       float(raw.get("paused_until", 0)))
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable shared rate-limit entry; starting from an idle account")
            return cls()


@dataclass(frozen=True)
class Schedule:
    """The rates of :class:`RateLimits` as GCRA intervals (seconds per request / per token) and bursts."""

    request_interval: float | None
    request_burst: float
    token_interval: float | None
    token_burst: float

    @classmethod
    def of(cls, limits: RateLimits, request_burst: float = 1.0, token_burst: float | None = None) -> Schedule:
        tpm = limits.tokens_per_minute
        return cls(
            request_interval=60.0 / limits.requests_per_minute if limits.requests_per_minute else None,
            request_burst=max(1.0, request_burst),
            token_interval=60.0 / tpm if tpm else None,
            token_burst=token_burst if token_burst is not None else max(1.0, (tpm or 60.0) / 60.0),
        )

    def reserve(self, state: RateState, now: float, tokens: int) -> tuple[RateState, float]:
        """``(state after, start time)`` of one request of ``tokens`` tokens asked at ``now``."""
        start = max(now, state.paused_until)
        if self.request_interval is not None:
            start = max(start, state.next_request - (self.request_burst - 1) * self.request_interval)
        if self.token_interval is not None and tokens > 0:
            start = max(start, state.next_token - (self.token_burst - min(tokens, self.token_burst))
                        * self.token_interval)
        after = state
        if self.request_interval is not None:
            after = replace(after, next_request=max(state.next_request, start) + self.request_interval)
        if self.token_interval is not None and tokens > 0:
            after = replace(after, next_token=max(state.next_token, start) + tokens * self.token_interval)
        return after, start

    def settle(self, state: RateState, now: float, reserved: int, used: int) -> RateState:
        """``state`` with the difference between reserved and used tokens given back (or charged)."""
        if self.token_interval is None:
            return state
        moved = state.next_token + (used - reserved) * self.token_interval
        if used < reserved:  # giving back never fills the bucket beyond full (next_token <= now)
            moved = max(moved, min(state.next_token, now))
        return replace(state, next_token=moved)


class SharedRateLimiter:
    """Requests and tokens per minute of one provider account, shared through a KV entry by every replica
    (see the module docstring), plus this process's concurrency cap. A
    :class:`~llamaduo.providers.limits.Limiter`."""

    def __init__(
        self,
        kv: Any,
        key: str,
        limits: RateLimits,
        *,
        request_burst: float = 1.0,
        token_burst: float | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        max_conflicts: int = 32,
    ) -> None:
        self.limits = limits
        self.schedule = Schedule.of(limits, request_burst, token_burst)
        self._clock = clock or time.time
        self._sleep = sleep or asyncio.sleep
        self.cell: KVCell[RateState] = KVCell(kv, key, what="shared rate limit", decode=RateState.from_bytes,
                                              encode=RateState.to_bytes, max_conflicts=max_conflicts, sleep=sleep,
                                              rng=rng)
        self._semaphore = asyncio.Semaphore(limits.max_concurrency)
        self.calls = 0

    @property
    def key(self) -> str:
        return self.cell.key

    async def acquire(self, tokens: int = 0) -> float:
        """Reserve a start time for one request and ``tokens`` tokens, and wait for it; return the seconds
        waited."""
        self.calls += 1

        def reserve(state: RateState | None) -> tuple[RateState, float]:
            return self.schedule.reserve(state or RateState(), self._clock(), tokens)

        start = await self.cell.change(reserve)
        wait = start - self._clock()
        if wait <= 0:
            return 0.0
        log.debug("shared rate limit %s: waiting %.2f s", self.key, wait)
        await self._sleep(wait)
        return wait

    async def settle(self, reserved: int, used: int) -> None:
        """Give back (or charge) the tokens a request used less (more) than reserved."""
        if self.schedule.token_interval is None or reserved == used:
            return
        await self.cell.change(lambda state: (
            self.schedule.settle(state or RateState(), self._clock(), reserved, used), None))

    async def pause(self, seconds: float) -> None:
        """No replica starts a request of this account for ``seconds`` (the provider answered 429)."""
        until = self._clock() + max(0.0, seconds)
        await self.cell.change(lambda state: (
            replace(state or RateState(), paused_until=max((state or RateState()).paused_until, until)), None))
        log.info("shared rate limit %s: every replica paused for %.1f s (429)", self.key, seconds)

    def slot(self) -> asyncio.Semaphore:
        """``async with limiter.slot():`` bounds this process's attempts in flight to ``max_concurrency``."""
        return self._semaphore


# ------------------------------------------------------------------------------------------ the services


def is_shared(spec: ProviderSpec) -> bool:
    """Whether ``spec``'s limits are an account's over the network with a rate to share."""
    return spec.provider in SHARED_PROVIDERS and bool(
        spec.limits.requests_per_minute or spec.limits.tokens_per_minute)


async def shared_limiter(bus: Any, spec: ProviderSpec) -> SharedRateLimiter | None:
    """The limiter of ``spec``'s account shared by every replica on ``bus``'s installation, or None when
    its limits stay in the process (see :func:`is_shared`)."""
    if not is_shared(spec):
        return None
    from llamaduo.bus.topology import open_bucket, rate_limit_bucket

    kv = await open_bucket(bus.broker, bus.settings, rate_limit_bucket(bus.settings),
                           description="provider rate limits shared by all replicas")
    return SharedRateLimiter(kv, account_key(spec), spec.limits)


async def make_shared_provider(
    bus: Any, spec: ProviderSpec, task: TaskSpec, *, make: Callable[..., Provider] = make_provider
) -> Provider:
    """``make(spec, task)`` (:func:`~llamaduo.providers.base.make_provider`) for a service: rate-limited
    through ``spec``'s account limits shared by every replica (:func:`shared_limiter`) when it has any
    (passed as ``limiter=``), else with the provider's own in-process limiter."""
    limiter = await shared_limiter(bus, spec)
    return make(spec, task) if limiter is None else make(spec, task, limiter=limiter)
