"""The one provider interface for service LLMs (judge and synthesizer talk only to this).

A provider turns a :class:`CompletionRequest` into a :class:`Completion` with token counts and cost.
Network providers read ``messages``; the offline ``simulated`` provider reads ``context`` (the same inputs,
structured), so both go through the same prompt-building, JSON-parsing and validation code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.errors import ProviderError

if TYPE_CHECKING:
    from llamaduo.providers.limits import Limiter


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionRequest(BaseModel):
    purpose: Literal["judge", "synthesize", "chat"]
    messages: list[ChatMessage]
    json_schema: dict[str, Any] | None = Field(default=None, description="Structured output schema, if any")
    temperature: float = 0.0
    max_tokens: int | None = None
    context: dict[str, Any] = Field(default_factory=dict, description="Structured inputs behind the prompt")


class Completion(BaseModel):
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    model: str = ""
    cached: bool = False


class Provider(ABC):
    """A service LLM. Implementations must be safe to call concurrently from one event loop."""

    #: name shown in logs and reports; the simulated one says so
    name: str = "provider"
    simulated: bool = False

    def __init__(self, spec: ProviderSpec, task: TaskSpec) -> None:
        self.spec = spec
        self.task = task

    @abstractmethod
    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer one request. Raise :class:`ProviderError` when it cannot."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token) for providers that report none."""
    return max(1, len(text) // 4)


def make_provider(spec: ProviderSpec, task: TaskSpec, *, limiter: Limiter | None = None) -> Provider:
    """Build the provider named by ``spec.provider``.

    ``simulated``: the task oracle; ``openai`` / ``openai-compatible``: Chat Completions through the
    ``openai`` client; ``gemini``: the ``google-genai`` client; ``local``: a transformers causal LM on this
    machine (``model`` as for a student's base model; loaded on its first call). ``limiter`` replaces the
    in-process rate limiter of ``spec.limits`` (the services pass the one shared by all replicas, see
    :func:`llamaduo.providers.shared_limits.make_shared_provider`); the simulated provider has none. Raise
    :class:`ProviderError` when a network provider cannot be built (e.g. its API key is not set).
    """
    if spec.provider == "simulated":
        from llamaduo.providers.simulated import SimulatedProvider

        return SimulatedProvider(spec, task)
    if spec.provider in ("openai", "openai-compatible"):
        from llamaduo.providers.openai_provider import OpenAIProvider

        return OpenAIProvider(spec, task, limiter=limiter)
    if spec.provider == "gemini":
        from llamaduo.providers.gemini_provider import GeminiProvider

        return GeminiProvider(spec, task, limiter=limiter)
    if spec.provider == "local":
        from llamaduo.providers.local_provider import LocalProvider

        return LocalProvider(spec, task, limiter=limiter)
    raise ProviderError(f"unknown provider {spec.provider!r}")
