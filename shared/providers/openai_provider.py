"""OpenAI and OpenAI-compatible service LLMs (Chat Completions) through the official ``openai`` client.

* ``provider: openai``: api.openai.com (or ``base_url`` if given); the key comes from the environment
  variable named by ``api_key_env`` (default ``OPENAI_API_KEY``) and must be set.
* ``provider: openai-compatible``: any server speaking the Chat Completions API at ``base_url`` (vLLM,
  llama.cpp, Ollama, LiteLLM, Azure-style gateways ...); a missing key is allowed (a placeholder is sent).

A request with ``json_schema`` asks for structured output (``response_format`` of type ``json_schema``,
strict when the schema allows it). Temperature and ``max_tokens`` come from the request; the official API
gets ``max_completion_tokens`` (reasoning models: no temperature and room for their reasoning tokens),
compatible servers get ``max_tokens``. A server that rejects that with HTTP 400 is asked again at once with
``{"type": "json_object"}``, and that provider keeps using JSON mode afterwards.

The client's own retries are off: :class:`~llamaduo.providers.limits.CallGuard` rate-limits, times out
and retries every call. Token counts come from the response's ``usage`` (estimated when absent), the cost
from :mod:`llamaduo.providers.pricing`. The key is never logged nor put into an error message.

With ``batch_api: true`` the same request bodies (built by :meth:`OpenAIProvider.chat_body` for both
paths) go through the Batch API instead, gathered by :class:`~llamaduo.providers.openai_batch.OpenAIBatcher`
from concurrent calls, at the batch price (half the synchronous one); callers see no difference except the
wait. A failed line fails only its call (retryable where asking again may work; a line rejected with HTTP
400 while json_schema was asked for switches to JSON mode like the synchronous path, and is retryable).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError, estimate_tokens
from llamaduo.providers.limits import (
    CallGuard,
    Clock,
    Failure,
    Limiter,
    RetryPolicy,
    Sleep,
    is_retryable_status,
    parse_retry_after,
)
from llamaduo.providers.openai_batch import BatchLineError, OpenAIBatcher
from llamaduo.providers.pricing import price_for

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
#: Extra completion tokens granted to reasoning models (their hidden reasoning counts as output).
REASONING_TOKEN_ALLOWANCE = 4096
#: Model families that reason before answering: no temperature, larger token cap.
REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
#: Sent as the key to an openai-compatible server when no key is configured (the client needs one).
PLACEHOLDER_KEY = "not-needed"


class OpenAIProvider(Provider):
    """A Chat Completions service LLM (``openai`` or ``openai-compatible``)."""

    def __init__(
        self,
        spec: ProviderSpec,
        task: TaskSpec,
        *,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        limiter: Limiter | None = None,
        json_mode_fallback: bool = True,
    ) -> None:
        """Build the client. Raise :class:`ProviderError` when ``provider: openai`` has no key."""
        super().__init__(spec, task)
        if spec.provider not in ("openai", "openai-compatible"):
            raise ProviderError(f"OpenAIProvider cannot serve provider {spec.provider!r}")
        self.key_env = spec.api_key_env or DEFAULT_KEY_ENV
        key = os.environ.get(self.key_env) or None
        if key is None:
            if spec.provider == "openai":
                raise ProviderError(
                    f"provider 'openai' needs an API key: set the environment variable {self.key_env} "
                    "(or name another one in api_key_env)"
                )
            key = PLACEHOLDER_KEY
        self.name = f"{spec.provider}:{spec.model}"
        self.price = price_for(spec.model, spec, batch=spec.batch_api)
        self.guard = CallGuard(spec, policy=policy, clock=clock, sleep=sleep, rng=rng, secrets=[key],
                               limiter=limiter)
        self.json_mode_fallback = json_mode_fallback
        self._schema_supported = True
        self._client = AsyncOpenAI(
            api_key=key,
            base_url=spec.base_url or None,
            max_retries=0,
            # the guard bounds every attempt; the client's own limit is a looser backstop
            timeout=self.guard.policy.timeout + 5 if self.guard.policy.timeout else None,
        )
        self.batcher: OpenAIBatcher | None = None
        if spec.batch_api:
            self.batcher = OpenAIBatcher(
                self._client,
                self.guard,
                self._classify,
                describe=f"{self.where} (Batch API)",
                window_seconds=spec.batch_window_seconds,
                max_requests=spec.batch_max_requests,
                poll_seconds=spec.batch_poll_seconds,
                timeout_seconds=spec.batch_timeout_seconds,
                sleep=sleep,
                clock=clock,
            )

    @property
    def where(self) -> str:
        return f"{self.spec.provider} model {self.spec.model!r}" + (
            f" at {self.spec.base_url}" if self.spec.base_url else ""
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        """Send ``request`` (retrying per the spec; through the Batch API with ``batch_api``); raise
        :class:`ProviderError` when it fails."""
        if not request.messages:
            raise ProviderError(f"{self.where}: the request has no messages")
        prompt_estimate = estimate_tokens("\n".join(m.content for m in request.messages))
        if self.batcher is not None:
            return await self._complete_batched(request, prompt_estimate)
        reserved = prompt_estimate + (request.max_tokens or 0)

        async def attempt() -> tuple[Any, str, int, int]:
            schema_mode = request.json_schema is not None and self._schema_supported
            try:
                response = await self._client.chat.completions.create(**self.chat_body(request))
            except openai.BadRequestError:
                if not (schema_mode and self.json_mode_fallback):
                    raise
                self._schema_supported = False
                log.warning(
                    "%s rejected response_format json_schema (HTTP 400); using json_object mode from now on",
                    self.where,
                )
                response = await self._client.chat.completions.create(**self.chat_body(request))
            return (response, *self._read(response, prompt_estimate))

        response, text, input_tokens, output_tokens = await self.guard.run(
            attempt, classify=self._classify, describe=f"{self.where} ({request.purpose})", tokens=reserved
        )
        await self.guard.limiter.settle(reserved, input_tokens + output_tokens)
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=self.price.cost(input_tokens, output_tokens),
            model=getattr(response, "model", None) or self.spec.model,
        )

    async def _complete_batched(self, request: CompletionRequest, prompt_estimate: int) -> Completion:
        assert self.batcher is not None
        describe = f"{self.where} ({request.purpose}, Batch API)"
        schema_mode = request.json_schema is not None and self._schema_supported
        try:
            body = await self.batcher.submit(self.chat_body(request))
        except BatchLineError as err:
            if err.status == 400 and schema_mode and self.json_mode_fallback:
                self._schema_supported = False
                log.warning(
                    "%s rejected response_format json_schema (HTTP 400); using json_object mode from now on",
                    describe,
                )
                raise ProviderError(f"{err} (asking again in json_object mode)", retryable=True) from None
            raise
        try:
            response = ChatCompletion.model_validate(body)
        except ValueError as err:
            raise ProviderError(
                self.guard.redact(f"{describe}: unreadable reply ({type(err).__name__}: {str(err)[:200]})"),
                retryable=True,
            ) from None
        try:
            text, input_tokens, output_tokens = self._read(response, prompt_estimate)
        except ProviderError as err:
            raise ProviderError(self.guard.redact(f"{describe}: {err}"), retryable=err.retryable) from None
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=self.price.cost(input_tokens, output_tokens),
            model=response.model or self.spec.model,
        )

    def chat_body(self, request: CompletionRequest) -> dict[str, Any]:
        """The Chat Completions request body for ``request``: the keyword arguments of a synchronous
        ``chat.completions.create`` and the ``body`` of a Batch API line alike."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        params: dict[str, Any] = {"model": self.spec.model, "messages": messages}
        reasoning = self.spec.provider == "openai" and is_reasoning_model(self.spec.model)
        if not reasoning:  # reasoning models accept only their default temperature
            params["temperature"] = request.temperature
        if request.max_tokens is not None:
            if self.spec.provider == "openai":
                # the official API's current name; reasoning tokens count against it, so leave them room
                extra = REASONING_TOKEN_ALLOWANCE if reasoning else 0
                params["max_completion_tokens"] = request.max_tokens + extra
            else:  # what every compatible server understands
                params["max_tokens"] = request.max_tokens
        if request.json_schema is not None:
            if self._schema_supported:
                params["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": f"{request.purpose}_reply",
                        "schema": request.json_schema,
                        "strict": strict_compatible(request.json_schema),
                    },
                }
            else:
                params["response_format"] = {"type": "json_object"}
        return params

    def _read(self, response: Any, prompt_estimate: int) -> tuple[str, int, int]:
        choices = getattr(response, "choices", None)
        if not choices:
            raise ProviderError("the reply has no choices", retryable=True)
        message = choices[0].message
        text = message.content
        if text is None:
            refusal = getattr(message, "refusal", None)
            if refusal:
                raise ProviderError(f"the model refused: {str(refusal)[:300]}")
            raise ProviderError("the reply has no content", retryable=True)
        usage = getattr(response, "usage", None)
        input_tokens = getattr(usage, "prompt_tokens", None)
        output_tokens = getattr(usage, "completion_tokens", None)
        if input_tokens is None:
            input_tokens = prompt_estimate
        if output_tokens is None:
            output_tokens = estimate_tokens(text)
        return text, int(input_tokens), int(output_tokens)

    def _classify(self, err: BaseException) -> Failure | None:
        if isinstance(err, openai.APITimeoutError):
            return Failure("request timed out", retryable=True)
        if isinstance(err, openai.APIConnectionError):
            return Failure(f"connection error ({type(err.__cause__ or err).__name__})", retryable=True)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            detail = _server_message(err)
            retryable = is_retryable_status(status)
            if status == 429 and _error_code(err) == "insufficient_quota":
                retryable = False  # out of credit: waiting will not help
            headers = getattr(err.response, "headers", None)
            return Failure(
                f"HTTP {status}" + (f": {detail}" if detail else ""),
                retryable=retryable,
                status=status,
                retry_after=parse_retry_after(headers) if retryable else None,
            )
        if isinstance(err, openai.APIResponseValidationError | openai.OpenAIError | ValueError):
            return Failure(f"unreadable reply ({type(err).__name__}: {str(err)[:200]})", retryable=True)
        return None

    async def aclose(self) -> None:
        """Fail calls still waiting for a batch, then close the HTTP client."""
        if self.batcher is not None:
            await self.batcher.aclose()
        await self._client.close()


def is_reasoning_model(model: str) -> bool:
    """True for OpenAI reasoning models (o1/o3/o4 families, gpt-5), which reject a temperature."""
    name = model.strip().lower()
    return any(name == p or name.startswith(p + "-") for p in REASONING_PREFIXES)


def strict_compatible(schema: Any) -> bool:
    """True when ``schema`` satisfies OpenAI's strict structured outputs: every object lists all its
    properties as required and sets ``additionalProperties: false``."""
    if not isinstance(schema, dict):
        return True
    subs: list[Any] = []
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties", True) is not False or set(schema.get("required", [])) != set(props):
            return False
        subs.extend(props.values())
    if isinstance(schema.get("items"), dict):
        subs.append(schema["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        subs.extend(schema.get(key) or [])
    for key in ("$defs", "definitions"):
        subs.extend((schema.get(key) or {}).values())
    return all(strict_compatible(s) for s in subs)


def _error_body(err: openai.APIStatusError) -> dict[str, Any]:
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return body if isinstance(body, dict) else {}


def _error_code(err: openai.APIStatusError) -> str | None:
    code = _error_body(err).get("code") or getattr(err, "code", None)
    return str(code) if code else None


def _server_message(err: openai.APIStatusError) -> str:
    message = _error_body(err).get("message") or ""
    if not message and isinstance(err.body, str):
        message = err.body
    return " ".join(str(message).split())[:300]
