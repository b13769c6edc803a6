"""Google Gemini service LLMs through the official ``google-genai`` client (``from google import genai``).

* The key comes from the environment variable named by ``api_key_env``, else ``GEMINI_API_KEY``, else
  ``GOOGLE_API_KEY``; one must be set. It is sent by the client as the ``x-goog-api-key`` header, never
  logged nor put into an error message.
* ``base_url`` (optional) overrides the endpoint through ``HttpOptions(base_url=...)``.
* A request with ``json_schema`` asks for JSON mode: ``response_mime_type="application/json"`` plus
  ``response_json_schema`` (plain JSON Schema, as google-genai >= 1.x accepts it).
* System messages become ``system_instruction``; ``assistant`` turns become ``model`` turns.
* Tokens come from ``usage_metadata``: input ``prompt_token_count``, output ``candidates_token_count``
  plus ``thoughts_token_count`` (thinking tokens are billed as output); estimated when absent.

The client's own retries are off (``HttpRetryOptions(attempts=1)``):
:class:`~llamaduo.providers.limits.CallGuard` rate-limits, times out and retries every call.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

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
from llamaduo.providers.pricing import price_for


def _transport_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """(timeouts, transport errors, decoding errors) of whichever HTTP stacks google-genai may use
    (httpx2, its requirement; httpx and aiohttp when installed)."""
    timeouts: list[type[BaseException]] = []
    transport: list[type[BaseException]] = []
    decoding: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transport.append(module.TransportError)
        decoding.append(module.DecodingError)
    try:
        import aiohttp

        transport.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(timeouts), tuple(transport), tuple(decoding)


_TIMEOUTS, _TRANSPORT, _DECODING = _transport_errors()

log = logging.getLogger(__name__)

DEFAULT_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
_BLOCKED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}


class GeminiProvider(Provider):
    """A Gemini service LLM (``provider: gemini``)."""

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
    ) -> None:
        """Build the client. Raise :class:`ProviderError` when no key is set."""
        super().__init__(spec, task)
        if spec.provider != "gemini":
            raise ProviderError(f"GeminiProvider cannot serve provider {spec.provider!r}")
        names = (spec.api_key_env,) if spec.api_key_env else DEFAULT_KEY_ENVS
        key = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if key is None:
            raise ProviderError(
                f"provider 'gemini' needs an API key: set the environment variable {' or '.join(names)}"
            )
        self.name = f"gemini:{spec.model}"
        self.price = price_for(spec.model, spec)
        self.guard = CallGuard(spec, policy=policy, clock=clock, sleep=sleep, rng=rng, secrets=[key],
                               limiter=limiter)
        timeout = self.guard.policy.timeout
        http_options = types.HttpOptions(
            base_url=spec.base_url or None,
            # the guard bounds every attempt; the client's own limit (milliseconds) is a looser backstop
            timeout=int((timeout + 5) * 1000) if timeout else None,
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(api_key=key, http_options=http_options)

    @property
    def where(self) -> str:
        return f"gemini model {self.spec.model!r}" + (f" at {self.spec.base_url}" if self.spec.base_url else "")

    async def complete(self, request: CompletionRequest) -> Completion:
        """Send ``request`` (retrying per the spec); raise :class:`ProviderError` when it fails."""
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        contents = [
            types.Content(role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)])
            for m in request.messages
            if m.role != "system"
        ]
        if not contents:
            raise ProviderError(f"{self.where}: the request has no user message")
        config = types.GenerateContentConfig(
            temperature=request.temperature,
            max_output_tokens=request.max_tokens,
            system_instruction=system or None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )
        if request.json_schema is not None:
            config.response_mime_type = "application/json"
            config.response_json_schema = request.json_schema
        prompt_estimate = estimate_tokens("\n".join(m.content for m in request.messages))
        reserved = prompt_estimate + (request.max_tokens or 0)

        async def attempt() -> Any:
            response = await self._client.aio.models.generate_content(
                model=self.spec.model, contents=contents, config=config
            )
            return response, self._text(response)

        response, text = await self.guard.run(
            attempt, classify=self._classify, describe=f"{self.where} ({request.purpose})", tokens=reserved
        )
        usage = getattr(response, "usage_metadata", None)
        input_tokens = getattr(usage, "prompt_token_count", None)
        output_tokens = getattr(usage, "candidates_token_count", None)
        thoughts = getattr(usage, "thoughts_token_count", None) or 0
        input_tokens = prompt_estimate if input_tokens is None else int(input_tokens)
        output_tokens = (estimate_tokens(text) if output_tokens is None else int(output_tokens)) + int(thoughts)
        await self.guard.limiter.settle(reserved, input_tokens + output_tokens)
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=self.price.cost(input_tokens, output_tokens),
            model=getattr(response, "model_version", None) or self.spec.model,
        )

    def _text(self, response: Any) -> str:
        """The reply text; a blocked reply is a non-retryable error, an empty one a retryable error."""
        feedback = getattr(response, "prompt_feedback", None)
        block = getattr(feedback, "block_reason", None)
        if block:
            raise ProviderError(f"the prompt was blocked ({_name(block)})")
        candidates = getattr(response, "candidates", None) or []
        texts = []
        if candidates:
            content = getattr(candidates[0], "content", None)
            for part in getattr(content, "parts", None) or []:
                if getattr(part, "text", None) and not getattr(part, "thought", False):
                    texts.append(part.text)
        if texts:
            return "".join(texts)
        reason = _name(getattr(candidates[0], "finish_reason", None)) if candidates else ""
        if reason in _BLOCKED:
            raise ProviderError(f"the reply was blocked ({reason})")
        raise ProviderError(
            "the reply has no text" + (f" (finish reason {reason})" if reason else ""), retryable=True
        )

    def _classify(self, err: BaseException) -> Failure | None:
        if isinstance(err, genai_errors.APIError):
            status = int(err.code) if isinstance(err.code, int) else None
            retryable = is_retryable_status(status)
            detail = " ".join(str(err.message or "").split())[:300]
            label = f"HTTP {status}" + (f" {err.status}" if err.status else "")
            headers = getattr(getattr(err, "response", None), "headers", None)
            wait = parse_retry_after(headers) if retryable else None
            if wait is None and retryable:
                wait = retry_info_delay(err.details)
            return Failure(
                label + (f": {detail}" if detail else ""), retryable=retryable, status=status, retry_after=wait
            )
        if isinstance(err, _TIMEOUTS):
            return Failure("request timed out", retryable=True)
        if isinstance(err, _TRANSPORT):
            return Failure(f"connection error ({type(err).__name__})", retryable=True)
        if isinstance(err, (*_DECODING, ValueError)):
            return Failure(f"unreadable reply ({type(err).__name__}: {str(err)[:200]})", retryable=True)
        return None

    async def aclose(self) -> None:
        await self._client.aio.aclose()


def retry_info_delay(details: Any) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` entry (``"retryDelay": "37s"``) of a Google error body."""
    error = details.get("error", details) if isinstance(details, dict) else None
    entries = error.get("details") if isinstance(error, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("@type", "")).endswith("RetryInfo"):
            raw = str(entry.get("retryDelay", "")).strip().removesuffix("s")
            try:
                return max(0.0, float(raw))
            except ValueError:
                return None
    return None


def _name(value: Any) -> str:
    return str(getattr(value, "name", None) or value or "")
