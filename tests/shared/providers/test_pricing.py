"""An unknown price is never counted as free against ``budget.max_cost``: refused before start (preflight's
:func:`missing_price`) and at run time (the budget makes no call)."""

from __future__ import annotations

import pytest

from llamaduo.contracts.spec import BudgetSpec, ProviderSpec, TaskSpec
from llamaduo.providers.base import ChatMessage, Completion, CompletionRequest, Provider
from llamaduo.providers.budget import BudgetedProvider, BudgetExhausted, MemoryLedger
from llamaduo.providers.pricing import Price, missing_price, price_for

TASK = TaskSpec(name="t")


def test_a_model_without_a_price_is_named_with_the_fields_to_set() -> None:
    unknown = ProviderSpec(provider="openai", model="my-finetune")
    why = missing_price(unknown, "judge_provider")
    assert why is not None and "judge_provider.model 'my-finetune' has no price" in why
    assert "judge_provider.price_input_per_mtok and judge_provider.price_output_per_mtok" in why
    half = ProviderSpec(provider="openai", model="my-finetune", price_input_per_mtok=1.0)
    assert "teacher.price_output_per_mtok (USD" in (missing_price(half) or "")
    assert price_for("my-finetune", half).source == "unknown"  # one side known is no price
    priced = ProviderSpec(provider="openai", model="my-finetune", price_input_per_mtok=1, price_output_per_mtok=2)
    assert missing_price(priced) is None
    assert missing_price(ProviderSpec(provider="gemini", model="gemini-2.5-flash-preview-05-20")) is None
    assert missing_price(ProviderSpec(provider="simulated")) is None  # the oracle is free
    assert missing_price(ProviderSpec(provider="local", model="smollm2-135m")) is None


class Priced(Provider):
    """A provider at a given price that answers every call; counts the calls it got."""

    def __init__(self, spec: ProviderSpec, price: Price) -> None:
        super().__init__(spec, TASK)
        self.price = price
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        return Completion(text="{}", input_tokens=10, output_tokens=5, cost=self.price.cost(10, 5))


REQUEST = CompletionRequest(purpose="judge", messages=[ChatMessage(role="user", content="x" * 40)], max_tokens=10)


async def test_a_cost_budget_refuses_calls_at_an_unknown_price() -> None:
    spec = ProviderSpec(provider="openai", model="my-finetune")
    inner = Priced(spec, price_for("my-finetune", spec))
    guarded = BudgetedProvider(inner, BudgetSpec(max_cost=1.0), MemoryLedger())
    with pytest.raises(BudgetExhausted, match=r"max_cost 1.0 is set but no price known for model 'my-finetune'"):
        await guarded.complete(REQUEST)
    assert inner.calls == 0 and guarded.exhausted

    tokens_only = BudgetedProvider(inner, BudgetSpec(max_service_tokens=1000), MemoryLedger())
    await tokens_only.complete(REQUEST)  # no cost limit: nothing to enforce with the price
    known = Priced(spec, Price(1.0, 2.0, "spec"))
    await BudgetedProvider(known, BudgetSpec(max_cost=1.0), MemoryLedger()).complete(REQUEST)
    free = Priced(ProviderSpec(provider="local", model="smollm2-135m"), Price(0.0, 0.0, "unknown", "free"))
    await BudgetedProvider(free, BudgetSpec(max_cost=1.0), MemoryLedger()).complete(REQUEST)
    assert (inner.calls, known.calls, free.calls) == (1, 1, 1)
