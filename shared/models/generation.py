"""Prompts and generation shared by training, evaluation, serving and the local provider."""

from __future__ import annotations

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
    return tokenizer.apply_chat_template(prompt_messages(prompt, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def chat_prompt_ids(tokenizer: Any, prompt: str, system_prompt: str = "") -> list[int]:
    """Token ids of :func:`chat_text`."""
    return list(tokenizer(chat_text(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"])
