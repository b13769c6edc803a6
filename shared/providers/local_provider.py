"""A service LLM on this machine: a transformers causal LM (``provider: local``).

``model`` names it like a student's base model (:func:`llamaduo.models.resolve.resolve_base_model`): a local
folder, a Hugging Face id (downloaded, or from the local cache with ``HF_HUB_OFFLINE=1``), ``smollm2-135m``
or ``tiny:<preset>``. It is loaded on the first call (in a worker thread), on the GPU when there is one.

* The request's messages go through the tokenizer's chat template (ChatML when it has none). A request
  with ``json_schema`` gets the schema appended to its last user message: a local model has no structured
  output mode, so a small one may still answer badly (the judge and the synthesizer re-ask and record the
  failures).
* Greedy decoding at temperature 0, sampling above; at most ``max_tokens`` new tokens (else
  :data:`~llamaduo.providers.budget.DEFAULT_REPLY_TOKENS`), and never beyond the model's context.
* Generation runs in a worker thread, one at a time (an :class:`asyncio.Lock`), so the event loop stays
  free and concurrent calls queue. Each generation is bounded by ``timeout_seconds`` (waiting in the queue
  does not count; a timed-out generation is told to stop at its next token, and the next call waits for
  it) and goes through the spec's rate limits (:class:`~llamaduo.providers.limits.CallGuard`). A local
  generation is not retried (it would only repeat itself): a timeout is a retryable :class:`ProviderError`
  for the caller, an exception in the model a non-retryable one.
* Token counts come from the tokenizer (prompt tokens; new tokens including the stop token); the cost is
  0 unless the spec sets prices (``price_input_per_mtok`` / ``price_output_per_mtok``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from typing import Any

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.models.generation import cut_at_stop, generate_new_tokens, messages_ids, stop_token_ids
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError
from llamaduo.providers.budget import DEFAULT_REPLY_TOKENS
from llamaduo.providers.limits import CallGuard, Failure, Limiter, RetryPolicy
from llamaduo.providers.pricing import Price, price_for

#: Appended to the last user message of a request with a JSON schema.
SCHEMA_INSTRUCTION = "Reply with only a JSON object that follows this JSON schema:\n{schema}"


class LocalProvider(Provider):
    """A transformers causal LM on this machine as the service LLM (see the module docstring)."""

    def __init__(self, spec: ProviderSpec, task: TaskSpec, *, model: Any = None, tokenizer: Any = None,
                 limiter: Limiter | None = None) -> None:
        """Remember the spec; the model is loaded on the first call (or pass ``model`` and ``tokenizer``).
        ``limiter`` replaces the in-process rate limiter of ``spec.limits``."""
        super().__init__(spec, task)
        if spec.provider != "local":
            raise ProviderError(f"LocalProvider cannot serve provider {spec.provider!r}")
        self.name = f"local:{spec.model}"
        priced = spec.price_input_per_mtok is not None or spec.price_output_per_mtok is not None
        self.price = price_for(spec.model, spec) if priced else Price(0.0, 0.0, "unknown", "a local model is free")
        self.guard = CallGuard(spec, policy=RetryPolicy.from_spec(spec, max_retries=0), limiter=limiter)
        self.model = model
        self.tokenizer = tokenizer
        self._lock = asyncio.Lock()  # calls queue here, outside the timeout
        self._running: asyncio.Future[list[int]] | None = None  # the worker thread's generation, if any

    def load(self) -> None:
        """Load the model and tokenizer now (blocking); raise :class:`ProviderError` when they cannot be."""
        if self.model is not None and self.tokenizer is not None:
            return
        from llamaduo.models.loading import load_causal_lm, load_tokenizer
        from llamaduo.models.resolve import resolve_base_model

        try:
            path = resolve_base_model(self.spec.model)
            tokenizer = load_tokenizer(path)
            model = load_causal_lm(path)
        except Exception as err:
            raise ProviderError(f"local model {self.spec.model!r} cannot be loaded: {type(err).__name__}: {err}"
                                ) from None
        model.eval()
        self.model, self.tokenizer = model, tokenizer

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's messages (schema included) as token ids of the model's chat template."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.json_schema is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if users:
                last = messages[users[-1]]
                schema = SCHEMA_INSTRUCTION.format(schema=json.dumps(request.json_schema, ensure_ascii=False))
                messages[users[-1]] = {**last, "content": f"{last['content']}\n\n{schema}"}
        return messages_ids(self.tokenizer, messages)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Generate the reply to ``request`` (see the module docstring); raise :class:`ProviderError`."""
        if not request.messages:
            raise ProviderError(f"{self.name}: the request has no messages")
        async with self._lock:
            if self.model is None or self.tokenizer is None:
                await asyncio.to_thread(self.load)
            try:
                ids = self.prompt_ids(request)
            except Exception as err:  # e.g. a chat template that refuses a role
                raise ProviderError(f"{self.name}: cannot build the prompt: {type(err).__name__}: {err}") from None
            max_new = self._max_new_tokens(len(ids), request.max_tokens)
            if self._running is not None:  # a timed-out generation may still be stopping in its thread
                await asyncio.wait([self._running])
            cancel = threading.Event()

            async def attempt() -> list[int]:
                generate = functools.partial(self._generate, ids, max_new, request.temperature, cancel)
                self._running = asyncio.get_running_loop().run_in_executor(None, generate)
                self._running.add_done_callback(_consume)
                try:
                    return await asyncio.shield(self._running)
                finally:
                    cancel.set()  # timed out or cancelled: stop the thread at its next token

            new_ids = await self.guard.run(attempt, classify=_classify, describe=f"{self.name} ({request.purpose})",
                                           tokens=len(ids) + max_new)
        await self.guard.limiter.settle(len(ids) + max_new, len(ids) + len(new_ids))
        return Completion(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
            input_tokens=len(ids),
            output_tokens=len(new_ids),
            cost=self.price.cost(len(ids), len(new_ids)),
            model=self.spec.model,
        )

    def _max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        limit = requested if requested is not None else DEFAULT_REPLY_TOKENS
        context = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(context, int):
            room = context - prompt_tokens
            if room < 1:
                raise ProviderError(f"{self.name}: the prompt has {prompt_tokens} tokens, the model's context "
                                    f"only {context}")
            limit = min(limit, room)
        return max(1, limit)

    def _stop_ids(self) -> list[int]:
        """The tokenizer's stop ids (:func:`~llamaduo.models.generation.stop_token_ids`) and the model's eos."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        extra = configured if isinstance(configured, list) else [configured]
        return sorted(set(stop_token_ids(self.tokenizer)) | {i for i in extra if isinstance(i, int)})

    def _generate(self, ids: list[int], max_new: int, temperature: float, cancel: threading.Event) -> list[int]:
        """New token ids up to and including the first stop token (runs in a worker thread)."""
        stop = self._stop_ids()
        (row,) = generate_new_tokens(
            self.model, ids, max_new_tokens=max_new, stop_ids=stop, pad_token_id=self.tokenizer.pad_token_id,
            temperature=temperature, should_stop=lambda _ids: cancel.is_set(),
        )  # fmt: skip
        return cut_at_stop(row, stop, keep_stop=True)[0]


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a generation nobody awaits any more (so asyncio does not log it)."""
    if not future.cancelled():
        future.exception()


def _classify(err: BaseException) -> Failure | None:
    """A generation that raised (out of memory, a model bug) is not worth repeating."""
    return Failure(f"generation failed ({type(err).__name__}: {str(err)[:300]})", retryable=False)
