"""The one validate-and-re-ask loop: re-asks with the bad reply, provider errors, the budget rule, the tally."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.errors import ProviderError
from llamaduo.providers.base import ChatMessage, Completion, CompletionRequest, Provider
from llamaduo.providers.budget import BudgetExhausted
from llamaduo.providers.reask import UsageTally, ask_until_valid

TASK = TaskSpec(name="triage", oracle="llamaduo.tasks.triage:oracle")
REQUEST = CompletionRequest(purpose="judge", messages=[ChatMessage(role="user", content="rate this")],
                            context={"seed": 2})


class Script(Provider):
    """Each call runs the next step: a reply text, or an exception to raise."""

    name = "script"

    def __init__(self, steps: list[str | BaseException]) -> None:
        super().__init__(ProviderSpec(model="fake"), TASK)
        self.steps = list(steps)
        self.requests: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return Completion(text=step, input_tokens=10, output_tokens=5, cost=0.5, cached=step == "cached 7")


def number(text: str) -> int:
    return int(text.split()[-1])  # ValueError for a reply that is no number


async def ask(provider: Provider, tally: UsageTally, attempts: int = 3,
              prepare: Callable[[CompletionRequest, int], CompletionRequest] | None = None):
    return await ask_until_valid(provider, REQUEST, number, reask=lambda err: f"again: {err}", attempts=attempts,
                                 semaphore=asyncio.Semaphore(1), tally=tally, prepare=prepare)


async def test_a_bad_reply_is_re_asked_with_the_reply_and_a_correction() -> None:
    provider, tally = Script(["seven", "cached 7"]), UsageTally()
    asked = await ask(provider, tally)
    assert asked.value == 7 and len(asked.errors) == 1 and asked.errors[0].startswith("invalid reply: ")
    second = provider.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "user"]
    assert second[1].content == "seven" and second[2].content.startswith("again: ")
    usage = tally.usage(simulated=False)
    assert (usage.calls, usage.input_tokens, usage.output_tokens, usage.cost, usage.cached) == (2, 20, 10, 1.0, 1)


async def test_retryable_errors_are_asked_again_and_others_stop() -> None:
    tally = UsageTally()
    asked = await ask(Script([ProviderError("busy", retryable=True), RuntimeError("bug"), "ok 3"]), tally)
    assert asked.value == 3 and asked.errors == ["provider error: busy", "provider raised RuntimeError: bug"]
    asked = await ask(Script([ProviderError("bad key"), "ok 1"]), tally)
    assert asked.value is None and asked.errors == ["provider error: bad key"]
    assert tally.calls == 4  # failed calls were made: they count


async def test_a_refused_call_is_no_call_and_stops() -> None:
    provider, tally = Script(["nope", BudgetExhausted("budget: not made"), "ok 1"]), UsageTally()
    asked = await ask(provider, tally)
    assert asked.value is None and asked.errors[-1] == "budget: not made"
    assert tally.calls == 1 and len(provider.requests) == 2


async def test_prepare_adjusts_each_attempt() -> None:
    def vary(request: CompletionRequest, attempt: int) -> CompletionRequest:
        seed = request.context["seed"] * 31 + attempt
        return request.model_copy(update={"context": {**request.context, "seed": seed}})

    provider = Script(["x", "y", "z"])
    asked = await ask(provider, UsageTally(), prepare=vary)
    assert asked.value is None and len(asked.errors) == 3
    assert [r.context["seed"] for r in provider.requests] == [62, 63, 64]
    assert REQUEST.context == {"seed": 2}
