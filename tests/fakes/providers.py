"""In-process provider doubles for domain tests that need no HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.providers.base import Completion, CompletionRequest, Provider


class Scripted(Provider):
    """Replies come from ``reply(call_number)`` (1-based, in the order the calls began)."""

    name = "scripted"

    def __init__(self, reply: Callable[[int], str], task: TaskSpec, *, input_tokens: int = 100,
                 output_tokens: int = 50) -> None:
        super().__init__(ProviderSpec(model="fake"), task)
        self.reply = reply
        self.calls = 0
        self.tokens = input_tokens, output_tokens

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        number = self.calls  # taken before yielding: calls of a wave run concurrently
        await asyncio.sleep(0)
        return Completion(text=self.reply(number), input_tokens=self.tokens[0], output_tokens=self.tokens[1])
