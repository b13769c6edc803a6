"""Loading models and tokenizers from local folders: chat template and pad token, bitsandbytes quantization,
the GPU when there is one, and trained students (what the trainer saves, described by its metadata file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: ChatML, the template given to models whose tokenizer has none (SmolLM2 itself uses ChatML).
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


def read_student_meta(model_dir: Path) -> dict[str, Any]:
    """The :data:`STUDENT_META_FILE` of a trained student folder."""
    path = Path(model_dir) / STUDENT_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a trained student folder: {STUDENT_META_FILE} is missing")
    return json.loads(path.read_text())
