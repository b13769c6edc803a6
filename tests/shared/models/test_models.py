"""Base model resolution: tiny models are deterministic and cached atomically; SmolLM2 converts from GGUF."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.models import resolve
from llamaduo.models.generation import prompt_messages
from llamaduo.models.loading import CHATML_TEMPLATE, load_tokenizer, prepare_tokenizer
from llamaduo.models.resolve import ModelResolutionError, cache_dir, resolve_base_model
from llamaduo.models.tiny import build_tiny


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def weights_hash(folder: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    build_tiny("llama", tmp_path / "a")
    build_tiny("llama", tmp_path / "b")
    assert weights_hash(tmp_path / "a") == weights_hash(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_resolve_tiny_caches_once(cache: Path) -> None:
    assert cache_dir() == cache
    first = Path(resolve_base_model("tiny:llama"))
    assert first.parent == cache / "models" and first.name.startswith("tiny-llama-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_base_model("tiny:llama")) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    leftovers = [p.name for p in (cache / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_tiny_model_size_and_tokenizer(cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = resolve_base_model("tiny:llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 500_000
    tok = load_tokenizer(path)
    assert 300 <= len(tok) <= 600
    text = "Ünïcödé ☃ 日本 \x00\x7f tabs\tand\nnewlines"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # any byte is encodable
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    rendered = tok.apply_chat_template(prompt_messages("hi", "sys"), tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prepare_tokenizer_adds_chatml_and_pad(cache: Path) -> None:
    tok = load_tokenizer(resolve_base_model("tiny:llama"))
    tok.chat_template = None
    tok.pad_token = None
    prepare_tokenizer(tok)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.pad_token == tok.eos_token


def test_failed_build_leaves_nothing(cache: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        resolve._build_cached(cache / "models" / "broken", broken)
    assert not [p.name for p in (cache / "models").iterdir() if p.name.startswith(("broken", ".broken.tmp"))]


def test_bad_names_are_refused(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="unknown tiny preset"):
        resolve_base_model("tiny:nope")
    with pytest.raises(ModelResolutionError, match="neither an existing folder"):
        resolve_base_model(str(tmp_path / "missing"))
    assert resolve_base_model(str(tmp_path)) == str(tmp_path.resolve())


def test_hub_id_offline_names_the_model(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="no-such-org/no-such-model"):
        resolve_base_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_smollm2_resolves_and_answers() -> None:
    """Converts the packaged GGUF once (about 25 s), then loads from the cache (uses the real cache dir)."""
    import torch

    from llamaduo.models.loading import load_causal_lm

    try:
        resolve.smollm2_gguf_path()
    except ModelResolutionError as err:
        pytest.skip(str(err))
    path = resolve_base_model("smollm2-135m")
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    assert "<|im_start|>" in tok.chat_template
    enc = tok.apply_chat_template(
        prompt_messages("What is the capital of France? Answer in one word."),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
