"""Ask a service LLM until its reply is usable: the one validate-and-re-ask loop of the judge and the
synthesizer.

:func:`ask_until_valid` makes a call (under the caller's concurrency bound), parses the reply and, when
it is not usable, asks again with the bad reply and a correction appended to the conversation, a bounded
number of times. It never raises for a failing provider or a bad reply: it returns the parsed value or
the reasons every attempt failed.

Usage is counted in a :class:`UsageTally`: every call made counts, failed ones included. A call that
:class:`~llamaduo.providers.budget.BudgetExhausted` refused was not made: it is no call, and the loop
stops (asking again cannot help).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llamaduo.contracts.events import Usage
from llamaduo.errors import ProviderError
from llamaduo.providers.base import ChatMessage, Completion, CompletionRequest, Provider
from llamaduo.providers.budget import BudgetExhausted

T = TypeVar("T")

#: How much of a bad reply is echoed back to the model when re-asking.
MAX_ECHOED_REPLY_CHARS = 2000


@dataclass
class UsageTally:
    """Service-LLM usage summed over the calls of one piece of work (several concurrent asks may share it)."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cached: int = 0

    def add(self, completion: Completion) -> None:
        """Count the tokens, cost and cache hit of one reply (the call itself is counted by the caller)."""
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens
        self.cost += completion.cost
        if completion.cached:
            self.cached += 1

    def usage(self, simulated: bool) -> Usage:
        """The total as a :class:`~llamaduo.contracts.events.Usage`."""
        return Usage(
            calls=self.calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.cost,
            cached=self.cached,
            simulated=simulated,
        )


@dataclass
class Asked(Generic[T]):
    """What :func:`ask_until_valid` got: the parsed ``value`` (``None`` when every attempt failed) and
    why each failed attempt failed, in order."""

    value: T | None
    errors: list[str] = field(default_factory=list)


async def ask_until_valid(
    provider: Provider,
    request: CompletionRequest,
    parse: Callable[[str], T],
    *,
    reask: Callable[[ValueError], str],
    attempts: int,
    semaphore: asyncio.Semaphore,
    tally: UsageTally,
    invalid: str = "invalid reply",
    prepare: Callable[[CompletionRequest, int], CompletionRequest] | None = None,
) -> Asked[T]:
    """Ask ``provider`` until ``parse`` accepts a reply, at most ``attempts`` times; never raises for the
    provider or the reply.

    ``parse`` raises ``ValueError`` for an unusable reply; the next attempt then carries that reply and
    the user message ``reask(error)``. A retryable :class:`~llamaduo.errors.ProviderError` (or any other
    exception from the provider) is asked again; a non-retryable one, or a call the budget refused, ends
    the loop. ``prepare(request, attempt)`` adjusts each attempt's request (e.g. its sampling seed).
    Failed attempts are described with ``invalid`` (bad replies), ``provider error`` or
    ``provider raised``.
    """
    messages = list(request.messages)
    errors: list[str] = []
    for attempt in range(attempts):
        current = request.model_copy(update={"messages": messages})
        if prepare is not None:
            current = prepare(current, attempt)
        try:
            async with semaphore:
                tally.calls += 1
                completion = await provider.complete(current)
        except BudgetExhausted as err:  # the call was not made: it is no call, and asking again cannot help
            tally.calls -= 1
            errors.append(str(err))
            break
        except ProviderError as err:
            errors.append(f"provider error: {err}")
            if not err.retryable:
                break
            continue
        except Exception as err:  # a provider bug must not crash the caller's whole batch
            errors.append(f"provider raised {type(err).__name__}: {err}")
            continue
        tally.add(completion)
        try:
            return Asked(parse(completion.text), errors)
        except ValueError as err:
            errors.append(f"{invalid}: {err}")
            messages = [
                *request.messages,
                ChatMessage(role="assistant", content=completion.text[:MAX_ECHOED_REPLY_CHARS]),
                ChatMessage(role="user", content=reask(err)),
            ]
    return Asked(None, errors)
