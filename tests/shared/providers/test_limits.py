"""Rate limits, retries, Retry-After, redaction and pricing of network providers (no network).

Everything time-related runs on :class:`FakeClock`, so the numbers below are exact and the tests instant.
"""

from __future__ import annotations

import asyncio
import random
import time
from email.utils import formatdate

import pytest
from fakes.llm_servers import FakeClock

from llamaduo.contracts.spec import ProviderSpec, RateLimits
from llamaduo.providers.base import ProviderError
from llamaduo.providers.limits import (
    Failure,
    RateLimiter,
    RetryPolicy,
    TokenBucket,
    call_with_retries,
    is_retryable_status,
    parse_retry_after,
    redact,
)
from llamaduo.providers.pricing import PRICE_TABLE, PRICES_AS_OF, cost, lookup, price_for

# ------------------------------------------------------------------------------------------ buckets


async def test_rpm_bucket_spaces_requests_evenly() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock, sleep=clock.sleep)  # 1 request per second, burst 1
    times = []
    for _ in range(5):
        await bucket.acquire()
        times.append(clock())
    assert times == pytest.approx([0, 1, 2, 3, 4])


async def test_concurrent_waiters_are_served_in_order_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=120), clock=clock, sleep=clock.sleep)
    order: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append((i, clock()))

    await asyncio.gather(*(one(i) for i in range(6)))
    assert [i for i, _ in order] == list(range(6))
    assert [t for _, t in order] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0, 2.5])


async def test_burst_lets_that_many_through_at_once() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, capacity=3, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(5):
        await bucket.acquire()
        times.append(clock())
    assert times == pytest.approx([0, 0, 0, 1, 2])


async def test_tpm_bucket_lets_a_large_request_through_and_charges_its_debt() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(tokens_per_minute=600), clock=clock, sleep=clock.sleep)  # 10 tok/s
    assert limiter.tokens is not None and limiter.tokens.capacity == 10
    await limiter.acquire(25)  # larger than the bucket: goes when full, leaves a debt of 15
    assert clock() == 0
    await limiter.acquire(5)  # waits for the debt plus its own 5 tokens: 2 s
    assert clock() == pytest.approx(2.0)


async def test_settle_returns_overestimated_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(tokens_per_minute=600), clock=clock, sleep=clock.sleep)
    await limiter.acquire(10)
    await limiter.settle(reserved=10, used=4)  # 6 tokens back
    await limiter.acquire(6)
    assert clock() == 0
    await limiter.settle(reserved=6, used=16)  # 10 more used than reserved: debt
    await limiter.acquire(1)
    assert clock() == pytest.approx(1.1)


async def test_unlimited_limiter_never_sleeps() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(), clock=clock, sleep=clock.sleep)
    assert limiter.unlimited
    for _ in range(100):
        await limiter.acquire(10_000)
    assert clock.sleeps == []


# ------------------------------------------------------------------------------------------ retries


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, jitter=0.5)
    rng = random.Random(1)
    delays = [policy.backoff(n, rng) for n in range(6)]
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for delay, base in zip(delays, bases, strict=True):
        assert base <= delay <= base * 1.5
    again = random.Random(1)
    assert delays == [policy.backoff(n, again) for n in range(6)]  # deterministic for a seeded rng


def test_policy_from_spec() -> None:
    policy = RetryPolicy.from_spec(ProviderSpec(max_retries=2, timeout_seconds=7), base_delay=0.1)
    assert (policy.max_retries, policy.timeout, policy.base_delay) == (2, 7, 0.1)


def test_retryable_statuses() -> None:
    assert all(is_retryable_status(s) for s in (408, 409, 429, 500, 502, 503, 504))
    assert not any(is_retryable_status(s) for s in (None, 200, 400, 401, 403, 404, 422))


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"Retry-After-Ms": "250", "Retry-After": "9"}) == 0.25
    now = time.time()
    assert parse_retry_after({"Retry-After": formatdate(now + 30, usegmt=True)}, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after({"Retry-After": formatdate(now - 30, usegmt=True)}, now=now) == 0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


class Flaky:
    """An attempt that fails ``failures`` times with ``error`` and then returns "ok"."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


class Boom(Exception):
    def __init__(self, failure: Failure | None) -> None:
        super().__init__("boom")
        self.failure = failure


def _classify(err: BaseException) -> Failure | None:
    return err.failure if isinstance(err, Boom) else None


async def test_retries_until_success_with_backoff() -> None:
    clock = FakeClock()
    attempt = Flaky(2, Boom(Failure("HTTP 500", retryable=True, status=500)))
    policy = RetryPolicy(max_retries=4, base_delay=1.0, jitter=0.0)
    result = await call_with_retries(
        attempt, policy=policy, classify=_classify, describe="x", sleep=clock.sleep
    )
    assert result == "ok" and attempt.calls == 3 and clock.sleeps == [1.0, 2.0]


async def test_retries_are_bounded_by_max_retries() -> None:
    clock = FakeClock()
    attempt = Flaky(99, Boom(Failure("HTTP 503", retryable=True, status=503)))
    policy = RetryPolicy(max_retries=3, base_delay=0.5, jitter=0.0)
    with pytest.raises(ProviderError) as info:
        await call_with_retries(attempt, policy=policy, classify=_classify, describe="svc m", sleep=clock.sleep)
    assert attempt.calls == 4 and clock.sleeps == [0.5, 1.0, 2.0]
    assert info.value.retryable and "svc m: HTTP 503" in str(info.value) and "4 attempts" in str(info.value)


async def test_retry_after_is_honoured_over_backoff() -> None:
    clock = FakeClock()
    attempt = Flaky(1, Boom(Failure("HTTP 429", retryable=True, status=429, retry_after=7.0)))
    policy = RetryPolicy(max_retries=2, base_delay=0.01)
    await call_with_retries(attempt, policy=policy, classify=_classify, describe="x", sleep=clock.sleep)
    assert len(clock.sleeps) == 1 and 7.0 <= clock.sleeps[0] <= 8.0


async def test_retry_after_beyond_the_cap_fails_at_once_as_retryable() -> None:
    clock = FakeClock()
    attempt = Flaky(1, Boom(Failure("HTTP 429", retryable=True, status=429, retry_after=3600)))
    with pytest.raises(ProviderError) as info:
        await call_with_retries(
            attempt, policy=RetryPolicy(max_retry_after=60), classify=_classify, describe="x", sleep=clock.sleep
        )
    assert info.value.retryable and attempt.calls == 1 and clock.sleeps == [] and "3600" in str(info.value)


async def test_non_retryable_failure_is_not_retried() -> None:
    clock = FakeClock()
    attempt = Flaky(5, Boom(Failure("HTTP 401", retryable=False, status=401)))
    with pytest.raises(ProviderError) as info:
        await call_with_retries(attempt, policy=RetryPolicy(), classify=_classify, describe="x", sleep=clock.sleep)
    assert not info.value.retryable and attempt.calls == 1 and clock.sleeps == []


async def test_unclassified_exceptions_propagate_unchanged() -> None:
    attempt = Flaky(1, KeyError("bug"))
    with pytest.raises(KeyError):
        await call_with_retries(attempt, policy=RetryPolicy(), classify=_classify, describe="x")
    assert attempt.calls == 1


async def test_each_attempt_is_bounded_by_the_timeout() -> None:
    calls = 0

    async def hang() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(30)
        return "never"

    start = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await call_with_retries(
            hang, policy=RetryPolicy(max_retries=2, timeout=0.05, base_delay=0.01), classify=_classify,
            describe="x",
        )
    assert calls == 3 and time.monotonic() - start < 1.0
    assert info.value.retryable and "timed out after 0.05 s" in str(info.value)


async def test_limiter_is_acquired_before_every_attempt() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=60), clock=clock, sleep=clock.sleep)
    attempt = Flaky(2, Boom(Failure("HTTP 500", retryable=True)))
    await call_with_retries(
        attempt, policy=RetryPolicy(base_delay=0.25, jitter=0), classify=_classify, describe="x",
        limiter=limiter, sleep=clock.sleep,
    )
    # backoff 0.25 then 0.5, each followed by the wait for the next request slot (1 request per second)
    assert attempt.calls == 3 and clock() == pytest.approx(2.0)


async def test_a_429_pauses_every_caller_of_the_limiter() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=600), clock=clock, sleep=clock.sleep)
    attempt = Flaky(1, Boom(Failure("HTTP 429", retryable=True, status=429, retry_after=5.0)))
    with pytest.raises(ProviderError):  # no retries: this caller gives up at once ...
        await call_with_retries(attempt, policy=RetryPolicy(max_retries=0), classify=_classify, describe="x",
                                limiter=limiter, sleep=clock.sleep)
    assert clock() == 0
    # ... and every other caller of the limiter waits what the server asked
    assert await limiter.acquire() == pytest.approx(5.0) and clock() == pytest.approx(5.0)


async def test_secrets_are_redacted_from_errors() -> None:
    key = "sk-proj-VERYSECRET0123456789"
    attempt = Flaky(1, Boom(Failure(f"HTTP 401: Incorrect API key provided: {key}", retryable=False)))
    with pytest.raises(ProviderError) as info:
        await call_with_retries(attempt, policy=RetryPolicy(), classify=_classify, describe="x", secrets=[key])
    assert key not in str(info.value) and "***" in str(info.value)


def test_redact_key_like_strings() -> None:
    assert redact("key sk-abcdef123456 and AIzaSyA1234567890abcdefghijklm", []) == "key *** and ***"
    assert redact("token hunter22 here", ["hunter22"]) == "token *** here"


# ------------------------------------------------------------------------------------------ pricing


def test_table_prices_and_snapshot_names() -> None:
    assert PRICES_AS_OF and PRICE_TABLE["gpt-4o-mini"] == (0.15, 0.60)
    assert lookup("gpt-4o-mini-2024-07-18") == ("gpt-4o-mini", (0.15, 0.60))  # not gpt-4o
    assert lookup("gpt-4o-2024-08-06")[0] == "gpt-4o"  # type: ignore[index]
    assert lookup("models/gemini-2.5-flash-lite-preview-06-17")[0] == "gemini-2.5-flash-lite"  # type: ignore[index]
    assert lookup("gpt-4.1")[0] == "gpt-4.1" and lookup("gpt-4.10") is None  # type: ignore[index]
    price = price_for("gemini-2.0-flash")
    assert (price.input_per_mtok, price.output_per_mtok, price.source) == (0.10, 0.40, "table")


def test_cost_arithmetic() -> None:
    # 1M input at 2.50 + 0.5M output at 10.00
    assert cost("gpt-4o", 1_000_000, 500_000) == pytest.approx(7.5)
    assert cost("gpt-4o-mini", 1234, 56) == pytest.approx((1234 * 0.15 + 56 * 0.60) / 1e6)


def test_spec_prices_win_and_fill_in() -> None:
    spec = ProviderSpec(provider="openai", model="gpt-4o", price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    assert price_for("gpt-4o", spec).source == "spec"
    assert cost("gpt-4o", 1_000_000, 1_000_000, spec) == pytest.approx(3.0)
    half = ProviderSpec(provider="openai", model="gpt-4o", price_input_per_mtok=1.0)
    p = price_for("gpt-4o", half)
    assert (p.input_per_mtok, p.output_per_mtok, p.source) == (1.0, 10.0, "spec+table")


def test_unknown_model_costs_zero_with_a_note() -> None:
    price = price_for("my-local-llama-unknown")
    assert price.source == "unknown" and price.cost(10**6, 10**6) == 0
    assert "price_input_per_mtok" in price.note
