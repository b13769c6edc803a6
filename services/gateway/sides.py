"""The two sides that can answer a route: the local model server over HTTP, and the upstream service LLM.

:class:`LocalSide` posts a Chat Completions request to ``llamaduo serve`` or vLLM (``httpx2``, the HTTP client
the ``openai`` package uses) and turns every way it can fail into a :class:`LocalFailure` with the fallback
reason: ``unavailable`` (cannot connect), ``timeout``, ``overloaded`` (HTTP 429/503, or this gateway's own
per-route cap of open local requests is full), ``error`` (any other failure or an unreadable reply).
:class:`UpstreamSide` goes through the project's provider interface (:func:`llamaduo.providers.base.make_provider`).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx2

from llamaduo.contracts.gateway import FallbackReason
from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.providers.base import ChatMessage, CompletionRequest, Provider, estimate_tokens, make_provider
from llamaduo.services.gateway.config import LocalConfig

#: Request fields passed on to the local server (the rest, e.g. ``user`` or ``tools``, stay here).
LOCAL_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "seed")


@dataclass(frozen=True)
class Answer:
    """One complete answer of either side."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = "stop"
    cost: float = 0.0


class LocalFailure(Exception):
    """The local side could not answer; ``reason`` is the fallback reason, ``detail`` short and secret-free."""

    def __init__(self, reason: FallbackReason, detail: str, seconds: float = 0.0, *,
                 model_missing: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FallbackReason = reason
        self.detail = detail[:300]
        self.seconds = seconds
        #: the local server does not serve the model asked for (HTTP 404 / model-not-found), e.g. it restarted
        #: and lost the adapters loaded at run time
        self.model_missing = model_missing


class LocalSide:
    """The local model server of one route, at most ``max_concurrency`` requests open at once."""

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(config.timeout_seconds))
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def complete(self, body: dict[str, Any], model: str, messages: list[dict[str, str]]) -> Answer:
        """Ask the local server; raise :class:`LocalFailure` with the reason when it cannot answer."""
        if self._slots.locked():
            raise LocalFailure("overloaded", f"{self.config.max_concurrency} local requests already open")
        request = {k: body[k] for k in LOCAL_FIELDS if body.get(k) is not None}
        request.update(model=model, messages=messages, stream=False)
        started = time.monotonic()
        async with self._slots:
            try:
                reply = await asyncio.wait_for(self._client.post(self.url, json=request),
                                               self.config.timeout_seconds)
            except (TimeoutError, httpx2.TimeoutException):
                raise LocalFailure("timeout", f"no answer within {self.config.timeout_seconds:g} s",
                                   time.monotonic() - started) from None
            except httpx2.ConnectError as err:
                raise LocalFailure("unavailable", f"cannot connect to {self.config.base_url} "
                                   f"({type(err).__name__})", time.monotonic() - started) from None
            except httpx2.HTTPError as err:
                raise LocalFailure("error", f"{type(err).__name__}: {str(err)[:200]}",
                                   time.monotonic() - started) from None
        seconds = time.monotonic() - started
        if reply.status_code in (429, 503):
            raise LocalFailure("overloaded", f"HTTP {reply.status_code} from the local server", seconds)
        if reply.status_code != 200:
            raise LocalFailure("error", f"HTTP {reply.status_code}: {reply.text[:200]}", seconds,
                               model_missing=reply.status_code == 404 or "model_not_found" in reply.text[:2000])
        try:
            data = reply.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise LocalFailure("error", f"unreadable reply ({type(err).__name__})", seconds) from None
        usage = data.get("usage") or {}
        return Answer(text=text, seconds=seconds, finish_reason=choice.get("finish_reason") or "stop",
                      prompt_tokens=int(usage.get("prompt_tokens") or estimate_tokens(str(messages))),
                      completion_tokens=int(usage.get("completion_tokens") or estimate_tokens(text)))

    async def aclose(self) -> None:
        await self._client.aclose()


class UpstreamSide:
    """The route's service LLM through the provider interface (retries and rate limits as the spec says)."""

    def __init__(self, spec: ProviderSpec, route: str, *, provider: Provider | None = None) -> None:
        self.spec = spec
        self.provider = provider or make_provider(spec, TaskSpec(name=route))

    async def complete(self, body: dict[str, Any], messages: list[dict[str, str]]) -> Answer:
        """The upstream's answer; raises :class:`~llamaduo.errors.ProviderError` when it has none."""
        started = time.monotonic()
        temperature = body.get("temperature")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        completion = await self.provider.complete(CompletionRequest(
            purpose="chat", messages=[ChatMessage.model_validate(m) for m in messages],
            temperature=self.spec.temperature if temperature is None else float(temperature),
            max_tokens=int(max_tokens) if max_tokens else None))
        return Answer(text=completion.text, prompt_tokens=completion.input_tokens,
                      completion_tokens=completion.output_tokens, seconds=time.monotonic() - started,
                      cost=completion.cost)

    async def aclose(self) -> None:
        await self.provider.aclose()
