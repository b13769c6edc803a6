"""Loading models and tokenizers from local folders: chat template and pad token, bitsandbytes quantization,
the GPU when there is one, and trained students (what the trainer saves, described by its metadata file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

#: ChatML, the template given to models whose tokenizer has none (SmolLM2 itself uses ChatML).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: File in a trained student's folder describing how to load it.
STUDENT_META_FILE = "llamaduo_student.json"


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


class LoraMeta(BaseModel):
    """The LoRA rank and alpha a student was trained with."""

    r: int
    alpha: int


class StudentMeta(BaseModel):
    """What :data:`STUDENT_META_FILE` says about a trained student: how to load it."""

    method: Literal["lora", "full"]
    #: the base model as the spec named it (``tiny:llama``, ``smollm2-135m``, a folder, a Hugging Face id)
    base_model: str
    #: the folder the base was resolved to when training (used when ``base_model`` no longer resolves)
    base_model_path: str | None = None
    quantization: Literal["4bit", "8bit", "none"] = "none"
    lora: LoraMeta | None = None


def read_student_meta(model_dir: Path) -> StudentMeta:
    """The :data:`STUDENT_META_FILE` of a trained student folder."""
    path = Path(model_dir) / STUDENT_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a trained student folder: {STUDENT_META_FILE} is missing")
    return StudentMeta.model_validate(json.loads(path.read_text()))


def write_student_meta(model_dir: Path, meta: StudentMeta) -> None:
    """Write ``meta`` as the :data:`STUDENT_META_FILE` of ``model_dir``."""
    (Path(model_dir) / STUDENT_META_FILE).write_text(json.dumps(meta.model_dump(), indent=2))


def student_base_path(meta: StudentMeta) -> str:
    """The folder of a student's base model: its ``base_model`` resolved, else the ``base_model_path`` saved at
    training when that name no longer resolves (e.g. offline) and the folder is still there."""
    # imported here: resolve imports this module
    from llamaduo.models.resolve import ModelResolutionError, resolve_base_model

    try:
        return resolve_base_model(meta.base_model)
    except ModelResolutionError:
        saved = meta.base_model_path
        if saved and Path(saved).is_dir():
            return str(saved)
        raise


def load_student(model_dir: Path, base_model_path: str | None = None, *, quantization: str | None = None) -> Any:
    """Load the trained student in ``model_dir`` as one model, in eval mode.

    A LoRA student is its adapter on its base (``base_model_path``, default :func:`student_base_path`), loaded
    with the student's quantization (or ``quantization``) and merged into it when unquantized; a full student
    is its own folder.
    """
    meta = read_student_meta(model_dir)
    if meta.method != "lora":
        return load_causal_lm(model_dir).eval()
    from peft import PeftModel

    quantization = quantization or meta.quantization
    base = load_causal_lm(base_model_path or student_base_path(meta), quantization)
    model = PeftModel.from_pretrained(base, str(model_dir))
    if quantization == "none":
        model = model.merge_and_unload()
    return model.eval()
