"""The migration's service-LLM budget, enforced before each call (``BudgetSpec.max_service_tokens`` /
``max_cost``).

Judge workers and the synthesizer run concurrently (several processes, several calls in flight each), so
what a migration has spent is kept in one place they all update: a **spend ledger**, one JetStream KV
entry per migration (bucket ``<stream>_SPEND``), changed only with compare-and-set. Before a call, a
:class:`BudgetedProvider` *reserves* the call's worst case (estimated prompt tokens + ``max_tokens``;
see :func:`estimate_call`) if ``spent + reserved + worst case`` stays within the limits, else the call is
not made and :class:`BudgetExhausted` is raised. After the call the reservation is settled to the tokens
and cost the provider reported (a failed call releases it). Reservations held by calls in flight count
against the limit, so concurrent calls cannot overshoot together.

The ledger counts every call actually made, including work whose result the controller ignores (a batch
judged twice after a redelivery, a batch finished after its round was closed early), so it is never
below the usage the controller sums from events. Only the prompt estimate (4 characters a token) and, for
requests without ``max_tokens``, the reply estimate can be wrong; with ``max_tokens`` set (the judge) the
reply cannot exceed its reservation.

A migration with ``max_cost`` whose provider has no known price (:func:`~llamaduo.providers.pricing.missing_price`)
makes no call at all: counting its calls as free would leave the cost limit silently unenforced.

The controller turns a ``budget_exhausted`` report into ``migration.failed`` with reason ``budget``.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from llamaduo.bus.kv_cell import KVCell
from llamaduo.contracts.spec import BudgetSpec
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError, estimate_tokens
from llamaduo.providers.pricing import FREE_PROVIDERS

#: Reply tokens reserved for a request without ``max_tokens`` when nothing better is known.
DEFAULT_REPLY_TOKENS = 1024


class BudgetExhausted(ProviderError):
    """The call was not made: it could have taken the migration beyond its service-LLM budget."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class Spend:
    """Tokens and cost of a ledger entry."""

    tokens: int = 0
    cost: float = 0.0

    def plus(self, tokens: int, cost: float) -> Spend:
        """This spend with ``tokens``/``cost`` added."""
        return Spend(self.tokens + tokens, self.cost + cost)

    def within(self, budget: BudgetSpec) -> bool:
        """Whether this spend stays within ``budget``'s limits."""
        if budget.max_service_tokens is not None and self.tokens > budget.max_service_tokens:
            return False
        return not (budget.max_cost is not None and self.cost > budget.max_cost + 1e-12)


def has_limits(budget: BudgetSpec) -> bool:
    """Whether ``budget`` limits tokens or cost (otherwise no call needs a ledger)."""
    return budget.max_service_tokens is not None or budget.max_cost is not None


class SpendLedger(ABC):
    """Tokens and cost spent (or reserved) by one migration, shared by every worker."""

    @abstractmethod
    async def reserve(self, tokens: int, cost: float, budget: BudgetSpec) -> bool:
        """Add ``tokens``/``cost`` if the total stays within ``budget``; False (nothing added) otherwise."""

    @abstractmethod
    async def adjust(self, tokens: int, cost: float) -> None:
        """Add ``tokens``/``cost`` (negative: give back) unconditionally."""

    @abstractmethod
    async def spent(self) -> Spend:
        """The current total."""


class MemoryLedger(SpendLedger):
    """A ledger in this process only (tests, benchmarks, single-process use)."""

    def __init__(self, spent: Spend | None = None) -> None:
        self._spent = spent or Spend()
        self._lock = asyncio.Lock()

    async def reserve(self, tokens: int, cost: float, budget: BudgetSpec) -> bool:
        async with self._lock:
            after = self._spent.plus(tokens, cost)
            if not after.within(budget):
                return False
            self._spent = after
            return True

    async def adjust(self, tokens: int, cost: float) -> None:
        async with self._lock:
            self._spent = self._spent.plus(tokens, cost)

    async def spent(self) -> Spend:
        return self._spent


class KVLedger(SpendLedger):
    """A ledger in a JetStream KV entry (``{"tokens": int, "cost": float}``), changed by compare-and-set
    (:class:`~llamaduo.bus.kv_cell.KVCell`). A refused reservation writes the value it read back unchanged:
    the write succeeds only if that value was current, so a refusal is never decided on a stale copy."""

    def __init__(self, kv: Any, key: str, *, max_conflicts: int = 1000) -> None:
        self.key = key
        self.cell: KVCell[Spend] = KVCell(kv, key, what="spend ledger", decode=_decode_spend, encode=_encode_spend,
                                          max_conflicts=max_conflicts)

    async def _change(self, tokens: int, cost: float, budget: BudgetSpec | None) -> bool:
        def apply(current: Spend | None) -> tuple[Spend, bool]:
            current = current or Spend()
            after = current.plus(tokens, cost)
            if budget is not None and not after.within(budget):
                return current, False
            return after, True

        return await self.cell.change(apply)

    async def reserve(self, tokens: int, cost: float, budget: BudgetSpec) -> bool:
        return await self._change(tokens, cost, budget)

    async def adjust(self, tokens: int, cost: float) -> None:
        await self._change(tokens, cost, None)

    async def spent(self) -> Spend:
        return (await self.cell.read())[0] or Spend()


def _decode_spend(data: bytes) -> Spend:
    value = json.loads(data)
    return Spend(int(value.get("tokens", 0)), float(value.get("cost", 0.0)))


def _encode_spend(spend: Spend) -> bytes:
    return json.dumps({"tokens": spend.tokens, "cost": spend.cost}).encode()


def spend_bucket(stream_name: str) -> str:
    """KV bucket of the spend ledgers of an installation."""
    return f"{stream_name}_SPEND"


async def kv_ledger(bus: Any, migration_id: str) -> KVLedger:
    """The migration's ledger in the installation's spend bucket (created on first use)."""
    from llamaduo.bus.topology import open_bucket

    kv = await open_bucket(bus.broker, bus.settings, spend_bucket(bus.settings.stream_name))
    return KVLedger(kv, migration_id)


def estimate_call(request: CompletionRequest) -> tuple[int, int]:
    """``(prompt tokens, reply tokens)`` to reserve for ``request``.

    The prompt: 4 characters a token, as providers that report nothing count. The reply: ``max_tokens``
    when set (a hard cap), else for synthesis twice the seeds' size per asked example plus some slack,
    else :data:`DEFAULT_REPLY_TOKENS`.
    """
    prompt = estimate_tokens("\n".join(m.content for m in request.messages))
    if request.max_tokens is not None:
        return prompt, request.max_tokens
    if request.purpose == "synthesize":
        seeds = request.context.get("seeds") or []
        n = int(request.context.get("n") or 1)
        sizes = [estimate_tokens(str(s.get("instruction", "")) + str(s.get("response", "")))
                 for s in seeds if isinstance(s, dict)]
        per_example = (sum(sizes) / len(sizes)) if sizes else 256
        return prompt, int(2 * per_example * n) + 64
    return prompt, DEFAULT_REPLY_TOKENS


class BudgetedProvider(Provider):
    """A provider that makes a call only when the migration's budget allows it (see the module docstring).

    Once a call was refused the provider stays exhausted: every later call is refused at once (the
    controller fails the migration anyway). ``blocked`` counts refused calls.
    """

    def __init__(self, inner: Provider, budget: BudgetSpec, ledger: SpendLedger) -> None:
        super().__init__(inner.spec, inner.task)
        self.inner = inner
        self.budget = budget
        self.ledger = ledger
        self.name = inner.name
        self.simulated = inner.simulated
        self.blocked = 0

    @property
    def exhausted(self) -> bool:
        return self.blocked > 0

    @property
    def unpriced(self) -> str | None:
        """Why this provider's cost cannot be counted (its price is unknown), or None."""
        price = getattr(self.inner, "price", None)
        if price is None or price.source != "unknown" or self.inner.spec.provider in FREE_PROVIDERS:
            return None
        return price.note or f"no price known for model {self.inner.spec.model!r}"

    def _cost(self, input_tokens: int, output_tokens: int) -> float:
        price = getattr(self.inner, "price", None)
        return float(price.cost(input_tokens, output_tokens)) if price is not None else 0.0

    async def complete(self, request: CompletionRequest) -> Completion:
        if self.budget.max_cost is not None and (why := self.unpriced):
            self.blocked += 1
            raise BudgetExhausted(f"budget: budget.max_cost {self.budget.max_cost} is set but {why}; "
                                  f"no {request.purpose} call was made")
        prompt, reply = estimate_call(request)
        tokens, cost = prompt + reply, self._cost(prompt, reply)
        if self.exhausted or not await self.ledger.reserve(tokens, cost, self.budget):
            self.blocked += 1
            spent = await self.ledger.spent()
            raise BudgetExhausted(
                f"budget: a {request.purpose} call of up to {tokens} tokens / {cost:.4f} cost was not made; "
                f"spent {spent.tokens} tokens / {spent.cost:.4f} of max_service_tokens "
                f"{self.budget.max_service_tokens} / max_cost {self.budget.max_cost}"
            )
        try:
            completion = await self.inner.complete(request)
        except BaseException:
            await asyncio.shield(self.ledger.adjust(-tokens, -cost))
            raise
        used = completion.input_tokens + completion.output_tokens
        await self.ledger.adjust(used - tokens, completion.cost - cost)
        return completion

    async def aclose(self) -> None:
        await self.inner.aclose()


def with_budget(provider: Provider, budget: BudgetSpec, ledger: SpendLedger | None) -> Provider:
    """``provider`` guarded by ``budget`` when it has limits (and a ledger is given), else unchanged."""
    if ledger is None or not has_limits(budget):
        return provider
    return BudgetedProvider(provider, budget, ledger)


async def budgeted_provider(bus: Any, migration_id: str, budget: BudgetSpec, provider: Provider) -> Provider:
    """``provider`` guarded by the migration's ``budget`` through its shared ledger (:func:`kv_ledger`), or
    unchanged when the budget has no limits. ``provider`` is closed if the ledger cannot be opened."""
    if not has_limits(budget):
        return provider
    try:
        ledger = await kv_ledger(bus, migration_id)
    except BaseException:
        await provider.aclose()
        raise
    return with_budget(provider, budget, ledger)
