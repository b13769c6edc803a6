"""Tiny random-init Llama models with their own byte-level BPE tokenizer, built deterministically for fast CPU tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llamaduo.models.loading import CHATML_TEMPLATE

TINY_PREFIX = "tiny:"

#: Tiny model presets: Llama config fields. Change a preset and its cache folder name changes with it.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "llama-wide": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
}
_TINY_VOCAB_SIZE = 512
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY_RECIPE_VERSION = 1
#: Words the tiny tokenizer learns as whole tokens (at a line start and after a space), so the tiny model can
#: learn the test tasks (the ticket triage task's queues and keywords) from few rows.
_TINY_WORDS = [
    *("billing", "invoice", "refund", "charge", "payment"),
    *("shipping", "parcel", "delivery", "courier", "tracking"),
    *("account", "password", "login", "username", "profile"),
    *("technical", "crash", "error", "bug", "freeze"),
    "other",
]
#: Fixed corpus the tiny tokenizer learns its merges from (any byte stays encodable: byte-level BPE).
_TINY_CORPUS = [
    "Hello, there is a problem with my order. Please check it, thanks.",
    "Hi, I need help with the account, something is wrong with the system.",
    "Dear team, the answer is in the message. Regards, the user.",
    "Route this ticket to the right queue: billing, shipping, account or technical.",
    "You are a helpful assistant. Answer with one word only.",
    "The quick brown fox jumps over the lazy dog; 0123456789 and punctuation!?",
    "system user assistant: what is the question and what is the answer?",
    *(4 * [" ".join(_TINY_WORDS), "\n".join(_TINY_WORDS)]),
]


def tiny_recipe_hash(preset: str) -> str:
    """Short hash of everything that determines a tiny model, used in its cache folder name."""
    recipe = {
        "version": _TINY_RECIPE_VERSION,
        "config": TINY_PRESETS[preset],
        "vocab": _TINY_VOCAB_SIZE,
        "special": _TINY_SPECIAL_TOKENS,
        "corpus": _TINY_CORPUS,
        "template": CHATML_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        padding_side="left",
    )


def build_tiny(preset: str, dest: Path) -> None:
    """Build the tiny model ``preset`` into the folder ``dest`` (deterministic: same preset, same bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_PRESETS[preset],
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
