"""The rate limiter held in NATS (llamaduo.providers.shared_limits): several limiter instances, each on its own
connection to a real nats-server (as separate replicas would be), share one account's rate.

Timing assertions are lower bounds (a shared schedule cannot let requests start earlier than its slots) except
where a bound above is the point (a killed worker's slots pass); those leave generous slack for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from fakes.llm_servers import FakeClock

from llamaduo.bus.topology import rate_limit_bucket
from llamaduo.contracts.spec import ProviderSpec, RateLimits
from llamaduo.errors import ProviderError
from llamaduo.providers.limits import RateLimiter
from llamaduo.providers.shared_limits import (
    RateState,
    Schedule,
    SharedRateLimiter,
    account_key,
    is_shared,
)

KEY = "acct-test"


class Replicas:
    """Limiters on separate NATS connections sharing one KV entry."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.connections: list = []

    async def limiter(self, limits: RateLimits, **kw) -> SharedRateLimiter:
        nc = await nats.connect(self.settings.nats_url)
        self.connections.append(nc)
        kv = await nc.jetstream().create_key_value(bucket=rate_limit_bucket(self.settings))
        return SharedRateLimiter(kv, KEY, limits, **kw)

    async def close(self) -> None:
        for nc in self.connections:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture
async def replicas(settings) -> AsyncIterator[Replicas]:
    group = Replicas(settings)
    yield group
    await group.close()


# ------------------------------------------------------------------------------------------ no server


def test_account_key_names_the_account_never_the_secret(monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-proj-SECRET0123456789")
    base = ProviderSpec(provider="openai-compatible", base_url="http://llm:8000/v1", model="m", api_key_env="MY_KEY")
    key = account_key(base)
    assert key == account_key(base.model_copy(update={"base_url": "http://llm:8000/v1/", "temperature": 0.7}))
    others = [base.model_copy(update=u) for u in ({"base_url": "http://other/v1"}, {"model": "m2"},
                                                  {"api_key_env": "OTHER_KEY"})]
    assert len({key, *(account_key(o) for o in others)}) == 4
    assert "SECRET" not in key and "MY_KEY" not in key
    assert all(c.isalnum() or c in "-_" for c in key)
    assert account_key(ProviderSpec(provider="openai", model="gpt-4o")) == account_key(
        ProviderSpec(provider="openai", model="gpt-4o", api_key_env="OPENAI_API_KEY"))


def test_only_network_accounts_with_a_rate_are_shared() -> None:
    rpm = RateLimits(requests_per_minute=60)
    assert is_shared(ProviderSpec(provider="openai", model="gpt-4o", limits=rpm))
    assert is_shared(ProviderSpec(provider="gemini", model="g", limits=RateLimits(tokens_per_minute=1000)))
    assert not is_shared(ProviderSpec(provider="openai", model="gpt-4o"))  # no rate to share
    assert not is_shared(ProviderSpec(provider="local", model="x", limits=rpm))  # a model in each replica
    assert not is_shared(ProviderSpec(limits=rpm))  # simulated


def test_schedule_matches_the_in_process_buckets() -> None:
    """The same numbers as the in-process TokenBucket tests: even spacing, bursts, a large request's debt."""

    def starts(schedule: Schedule, amounts: list[int]) -> list[float]:
        state, out = RateState(), []
        for tokens in amounts:  # every request asked at t=0
            state, start = schedule.reserve(state, 0.0, tokens)
            out.append(start)
        return out

    assert starts(Schedule.of(RateLimits(requests_per_minute=60)), [0] * 5) == pytest.approx([0, 1, 2, 3, 4])
    burst = Schedule.of(RateLimits(requests_per_minute=60), request_burst=3)
    assert starts(burst, [0] * 5) == pytest.approx([0, 0, 0, 1, 2])
    tokens = Schedule.of(RateLimits(tokens_per_minute=600))  # 10 tokens/s, one second of allowance
    assert starts(tokens, [25, 5]) == pytest.approx([0, 2.0])
    paused = tokens.reserve(RateState(paused_until=7.0), 0.0, 1)[1]
    assert paused == 7.0


async def test_in_process_limiters_do_not_share_a_rate() -> None:
    """The problem: two replicas' in-process limiters each spend the whole allowance."""
    clock = FakeClock()
    a, b = (RateLimiter(RateLimits(requests_per_minute=60), clock=clock, sleep=clock.sleep) for _ in range(2))
    await asyncio.gather(*(lim.acquire() for lim in (a, b, a, b)))
    assert clock() == pytest.approx(1.0)  # 4 requests in 1 s at "60 per minute"


# ------------------------------------------------------------------------------------------ over NATS


async def test_two_replicas_share_one_rate(replicas: Replicas) -> None:
    limits = RateLimits(requests_per_minute=1200)  # one request every 0.05 s for the account
    a, b = await replicas.limiter(limits), await replicas.limiter(limits)
    began = time.time()
    done: list[float] = []

    async def one(limiter: SharedRateLimiter) -> None:
        await limiter.acquire()
        done.append(time.time())

    await asyncio.gather(*(one(a if i % 2 else b) for i in range(40)))
    # 40 requests, one slot each: the last cannot start before 39 intervals (in-process limiters: ~19)
    assert max(done) - began >= 39 * 0.05 - 0.01
    assert a.calls == b.calls == 20
    trips = (a.cell.round_trips + b.cell.round_trips) / 40
    print(f"two replicas, 40 acquires: {trips:.2f} NATS round trips per acquire, "
          f"{a.cell.conflicts + b.cell.conflicts} lost races")
    assert trips <= 4, f"{trips:.2f} NATS round trips per acquire"


async def test_a_429_seen_by_one_replica_pauses_the_other(replicas: Replicas) -> None:
    limits = RateLimits(requests_per_minute=6000)
    a, b = await replicas.limiter(limits), await replicas.limiter(limits)
    await b.acquire()
    await a.pause(1.0)
    began = time.monotonic()
    waited = await b.acquire()
    assert time.monotonic() - began >= 0.95 and waited >= 0.9


async def test_a_killed_replica_leaks_nothing(replicas: Replicas) -> None:
    limits = RateLimits(requests_per_minute=600)  # 0.1 s per request
    doomed = await replicas.limiter(limits)
    waiting = [asyncio.ensure_future(doomed.acquire()) for _ in range(5)]  # reserves 5 slots (0 .. 0.4 s)
    await asyncio.sleep(0.05)
    for task in waiting:
        task.cancel()
    await replicas.connections[0].close()  # the replica is gone with its reservations
    survivor = await replicas.limiter(limits)
    began = time.monotonic()
    await survivor.acquire()  # waits for the dead replica's slots to pass, no longer
    assert time.monotonic() - began < 2.0
    await asyncio.sleep(0.3)  # idle: the account's allowance is back, not held by anyone
    assert await survivor.acquire() == 0.0


async def test_many_contending_replicas_all_get_their_slot(replicas: Replicas) -> None:
    limits = RateLimits(requests_per_minute=6000)  # 0.01 s per request
    group = [await replicas.limiter(limits) for _ in range(6)]
    began = time.time()
    await asyncio.gather(*(group[i % 6].acquire() for i in range(60)))
    assert time.time() - began >= 59 * 0.01 - 0.01
    assert sum(lim.cell.conflicts for lim in group) > 0  # they did race for the entry
    trips = sum(lim.cell.round_trips for lim in group) / 60
    print(f"six replicas, 60 acquires: {trips:.2f} NATS round trips per acquire")


async def test_settled_tokens_go_back_to_every_replica(replicas: Replicas) -> None:
    limits = RateLimits(tokens_per_minute=600)  # 10 tokens/s, bucket of 10
    a, b = await replicas.limiter(limits), await replicas.limiter(limits)
    await a.acquire(10)
    await a.settle(reserved=10, used=4)  # 6 tokens back, for the other replica too
    assert await b.acquire(6) == 0.0
    await b.settle(reserved=6, used=16)  # 10 more used than reserved: a debt everyone pays
    assert await a.acquire(1) >= 0.9


async def test_an_unreachable_kv_is_a_retryable_provider_error(replicas: Replicas) -> None:
    limiter = await replicas.limiter(RateLimits(requests_per_minute=60))
    await replicas.connections[0].close()
    with pytest.raises(ProviderError) as info:
        await limiter.acquire()
    assert info.value.retryable and KEY in str(info.value)
