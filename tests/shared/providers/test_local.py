"""The ``local`` provider: a tiny random transformers model as the service LLM (CPU, seconds)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llamaduo.contracts.events import JudgeItem
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, TaskSpec
from llamaduo.models.resolve import resolve_base_model
from llamaduo.providers.base import ChatMessage, CompletionRequest, ProviderError, make_provider
from llamaduo.providers.local_provider import LocalProvider
from llamaduo.services.judge.domain import JudgeCache, judge_items

TASK = TaskSpec(name="t")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ``tiny:llama`` model, built into a private cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield resolve_base_model("tiny:llama")


@pytest.fixture(scope="module")
def loaded(tiny_path: str) -> LocalProvider:
    provider = LocalProvider(ProviderSpec(provider="local", model=tiny_path), TASK)
    provider.load()
    return provider


def local(tiny_path: str, loaded: LocalProvider, **spec: Any) -> LocalProvider:
    """A provider on the module's model (loaded once) with its own spec."""
    return LocalProvider(ProviderSpec(provider="local", model=tiny_path, **spec), TASK, model=loaded.model,
                         tokenizer=loaded.tokenizer)


def request(text: str, max_tokens: int | None = 16, temperature: float = 0.0, **extra: Any) -> CompletionRequest:
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=text)]
    return CompletionRequest(purpose="chat", messages=messages, max_tokens=max_tokens, temperature=temperature,
                             **extra)


def reference_generate(provider: LocalProvider, req: CompletionRequest, **kwargs: Any) -> list[int]:
    """What ``model.generate`` gives for the chat-formatted prompt, computed here independently."""
    import torch

    tok = provider.tokenizer
    text = tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = provider.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=req.max_tokens, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **kwargs)
    return [ids.shape[1], *out[0, ids.shape[1] :].tolist()]


def test_make_provider_builds_without_loading(tiny_path: str) -> None:
    provider = make_provider(ProviderSpec(provider="local", model=tiny_path), TASK)
    assert isinstance(provider, LocalProvider) and provider.name == f"local:{tiny_path}"
    assert provider.model is None and not provider.simulated


async def test_greedy_completion_is_what_the_tokenizer_says(tiny_path: str, loaded: LocalProvider) -> None:
    provider = local(tiny_path, loaded)
    req = request("Route this ticket: my invoice is wrong", max_tokens=12)
    completion = await provider.complete(req)
    prompt_tokens, *new = reference_generate(provider, req, do_sample=False)
    assert completion.input_tokens == prompt_tokens == len(provider.prompt_ids(req))
    assert completion.output_tokens == len(new) == 12  # max_tokens respected (a random model rarely stops)
    assert completion.text == provider.tokenizer.decode(new, skip_special_tokens=True)
    assert completion.cost == 0.0 and completion.model == tiny_path
    assert (await provider.complete(req)).text == completion.text  # greedy: deterministic


async def test_sampling_at_temperature(tiny_path: str, loaded: LocalProvider) -> None:
    import torch

    provider = local(tiny_path, loaded)
    req = request("hello there", max_tokens=10, temperature=0.9)
    torch.manual_seed(7)
    completion = await provider.complete(req)
    torch.manual_seed(7)
    _, *new = reference_generate(provider, req, do_sample=True, temperature=0.9, top_p=1.0, top_k=0)
    cut = next((i + 1 for i, t in enumerate(new) if t == provider.tokenizer.eos_token_id), len(new))
    assert completion.text == provider.tokenizer.decode(new[:cut], skip_special_tokens=True)
    assert completion.output_tokens == cut and completion.text.strip()  # sampling: real (random) text


async def test_schema_goes_into_the_prompt_and_prices_into_the_cost(tiny_path: str, loaded: LocalProvider) -> None:
    provider = local(tiny_path, loaded, price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    plain = request("Give me JSON", max_tokens=4)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    with_schema = plain.model_copy(update={"json_schema": schema})
    text = provider.tokenizer.decode(provider.prompt_ids(with_schema))
    assert '"answer"' in text and "JSON schema" in text
    assert len(provider.prompt_ids(with_schema)) > len(provider.prompt_ids(plain))
    completion = await provider.complete(with_schema)
    assert completion.cost == pytest.approx((completion.input_tokens * 1.0 + completion.output_tokens * 2.0) / 1e6)


async def test_concurrent_calls_queue_and_leave_the_loop_free(tiny_path: str, loaded: LocalProvider) -> None:
    provider = local(tiny_path, loaded)
    prompts = ["first question", "a second, longer question about invoices", "third", "fourth one"]
    sequential = [await provider.complete(request(p, max_tokens=24)) for p in prompts]

    active, peak, ticks = 0, 0, 0
    generate = provider.model.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            time.sleep(0.05)  # long enough for the event loop to tick meanwhile
            return generate(*args, **kwargs)
        finally:
            active -= 1

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    provider.model = _Wrapped(provider.model, counting_generate)
    tick = asyncio.create_task(ticker())
    try:
        together = await asyncio.gather(*(provider.complete(request(p, max_tokens=24)) for p in prompts))
    finally:
        tick.cancel()
    assert [c.model_dump() for c in together] == [c.model_dump() for c in sequential]
    assert peak == 1  # one generation at a time
    assert ticks >= 10  # the loop ran while the model generated


async def test_timeout_is_a_retryable_error_and_the_next_call_works(tiny_path: str, loaded: LocalProvider) -> None:
    provider = local(tiny_path, loaded, timeout_seconds=0.1)
    generate = provider.model.generate

    def slow_generate(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return generate(*args, **kwargs)

    provider.model = _Wrapped(provider.model, slow_generate)
    with pytest.raises(ProviderError, match=r"timed out after 0\.1 s") as info:
        await provider.complete(request("hello", max_tokens=400))
    assert info.value.retryable
    provider.model = loaded.model
    assert (await provider.complete(request("hello", max_tokens=3))).output_tokens == 3


async def test_unknown_model_is_a_clear_provider_error() -> None:
    provider = make_provider(ProviderSpec(provider="local", model="/no/such/model/folder"), TASK)
    with pytest.raises(ProviderError, match="local model '/no/such/model/folder' cannot be loaded") as info:
        await provider.complete(request("hello"))
    assert not info.value.retryable


async def test_judge_with_a_garbling_local_model_records_failures(tiny_path: str, loaded: LocalProvider) -> None:
    provider = local(tiny_path, loaded, temperature=0.7)
    items = [JudgeItem(item_id=f"i{n}", instruction="Route this ticket: my parcel is late",
                       reference="shipping", candidate=c) for n, c in enumerate(["shipping", "billing"])]
    scores, usage = await judge_items(items, provider, JudgeSpec(max_attempts=2), temperature=0.7,
                                      cache=JudgeCache())
    assert [s.item_id for s in scores] == ["i0", "i1"]
    assert all(s.failed and s.similarity is None for s in scores)
    assert all("judging failed after 2 attempt(s)" in s.reason and "invalid judgement" in s.reason for s in scores)
    assert usage.calls == 4 and usage.input_tokens > 4 * 100 and usage.output_tokens > 0
    assert usage.cost == 0.0 and not usage.simulated


class _Wrapped:
    """A model whose ``generate`` is replaced; everything else is the real model's."""

    def __init__(self, model: Any, generate: Any) -> None:
        self._model = model
        self.generate = generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
