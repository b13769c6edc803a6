"""Prompts and generation shared by training, evaluation, serving and the local provider."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any


def prompt_messages(instruction: str, system_prompt: str = "") -> list[dict[str, str]]:
    """Chat messages of one prompt (system message only when ``system_prompt`` is set); train and infer agree."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": instruction}]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer: the tokenizer's eos and ChatML's ``<|im_end|>`` when it has one."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def chat_text(tokenizer: Any, prompt: str, system_prompt: str = "") -> str:
    """One prompt through the student's chat template, assistant turn opened (as in training)."""
    return messages_text(tokenizer, prompt_messages(prompt, system_prompt))


def chat_prompt_ids(tokenizer: Any, prompt: str, system_prompt: str = "") -> list[int]:
    """Token ids of :func:`chat_text`."""
    return messages_ids(tokenizer, prompt_messages(prompt, system_prompt))


def messages_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` through the tokenizer's chat template, assistant turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def messages_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of :func:`messages_text` (the template already holds any special tokens)."""
    return list(tokenizer(messages_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def cut_at_stop(ids: list[int], stop_ids: Collection[int], *, keep_stop: bool = False) -> tuple[list[int], bool]:
    """``ids`` up to the first stop token, and whether there was one.

    The stop token itself is dropped, or kept with ``keep_stop`` (the local provider counts it as output).
    """
    for i, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[: i + 1 if keep_stop else i]), True
    return list(ids), False


def generate_new_tokens(
    model: Any,
    prompt: list[int] | Mapping[str, Any],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int],
    pad_token_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any | None = None,
    should_stop: Callable[[Any], bool] | None = None,
) -> list[list[int]]:
    """Run ``model.generate`` once (under ``torch.inference_mode``); the new token ids of each row, not cut.

    ``prompt``: one prompt's token ids, or a tokenizer's padded batch (``input_ids`` and ``attention_mask``).
    Greedy decoding at ``temperature`` 0, else sampling at ``temperature`` with ``top_p`` (no top-k). A row ends
    at any of ``stop_ids`` or after ``max_new_tokens``; every row ends once ``should_stop(input_ids)`` (the ids so
    far, prompts included) is true. ``streamer``: a transformers streamer, given the prompt then each new token.
    Cut the rows with :func:`cut_at_stop`.
    """
    import torch

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": sorted(stop_ids),
        "pad_token_id": pad_token_id,
    }
    if streamer is not None:
        kwargs["streamer"] = streamer
    if should_stop is not None:
        kwargs["stopping_criteria"] = _stop_when(should_stop)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        if isinstance(prompt, list):
            input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        else:
            inputs = {k: v.to(model.device) for k, v in prompt.items()}
        out = model.generate(**inputs, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def _stop_when(should_stop: Callable[[Any], bool]) -> Any:
    """A ``StoppingCriteriaList`` ending every row once ``should_stop(input_ids)`` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhen(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), should_stop(input_ids), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopWhen()])
