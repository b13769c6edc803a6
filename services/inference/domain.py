"""Answer test prompts with a trained student: batched, left-padded generation, K samples per prompt.

A student folder is what :func:`llamaduo.services.trainer.domain.train` saved: a LoRA adapter (loaded on
its base model) or a whole model, described by its ``llamaduo_student.json``. Heavy libraries are imported
inside functions, so importing this module is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaduo.services.trainer.domain import read_student_meta
from llamaduo.spec import InferenceSpec, StudentSpec
from llamaduo.student import load_causal_lm, load_tokenizer, prompt_messages, resolve_base_model


class StudentGenerator:
    """A loaded student that answers prompts. Build it with :meth:`load`."""

    def __init__(self, model: Any, tokenizer: Any, inference: InferenceSpec, seed: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.inference = inference
        self.seed = seed
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, student: StudentSpec, model_dir: Path, *, base_model_path: str | None = None) -> StudentGenerator:
        """Load the student saved in ``model_dir``; generation settings come from ``student.inference``.

        ``base_model_path``: an already resolved base model folder for a LoRA student (default: resolve the
        base model named in the folder's metadata).
        """
        meta = read_student_meta(Path(model_dir))
        tokenizer = load_tokenizer(model_dir)
        if meta["method"] == "lora":
            from peft import PeftModel

            base = load_causal_lm(base_model_path or resolve_base_model(meta["base_model"]), meta["quantization"])
            model = PeftModel.from_pretrained(base, str(model_dir))
            if meta["quantization"] == "none":
                model = model.merge_and_unload()
        else:
            model = load_causal_lm(model_dir)
        model.eval()
        return cls(model, tokenizer, student.inference, seed=student.training.seed)

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def _generate_batch(self, texts: list[str], sample: bool) -> list[list[int]]:
        """New token ids for each text, cut at the first stop token."""
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        stop = self._stop_ids()
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.inference.max_new_tokens,
            "eos_token_id": stop,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:
            kwargs.update(do_sample=True, temperature=self.inference.temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        result = []
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            result.append(row[:cut])
        return result

    def _chat_texts(self, prompts: list[str], system_prompt: str) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                prompt_messages(p, system_prompt), tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def generate_tokens(self, prompts: list[str], system_prompt: str = "") -> list[list[list[int]]]:
        """Like :meth:`generate`, as token ids (new tokens only, up to the first stop token)."""
        import torch

        k = self.inference.samples_per_prompt
        sample = self.inference.temperature > 0
        texts = self._chat_texts(prompts, system_prompt)
        # Greedy answers are identical across samples: generate once, repeat K times.
        jobs = [t for t in texts for _ in range(k)] if sample else texts
        if sample:
            torch.manual_seed(self.seed)
        size = self.inference.batch_size
        # Batches of similar lengths waste less compute on padding; the longest go first (a batch that does
        # not fit in memory fails at once). Results go back to the prompts' order.
        lengths = [len(ids) for ids in self.tokenizer(jobs, add_special_tokens=False)["input_ids"]] if jobs else []
        order = sorted(range(len(jobs)), key=lambda i: -lengths[i])
        flat: list[list[int]] = [[] for _ in jobs]
        for start in range(0, len(jobs), size):
            batch = order[start : start + size]
            for i, ids in zip(batch, self._generate_batch([jobs[i] for i in batch], sample), strict=True):
                flat[i] = ids
        if sample:
            return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
        return [[ids] * k for ids in flat]

    def generate(self, prompts: list[str], system_prompt: str = "") -> list[list[str]]:
        """K = ``samples_per_prompt`` answers per prompt, stripped (greedy at temperature 0, else seeded sampling).

        Prompts are chat-formatted with the student's template, left-padded and generated in batches of
        ``inference.batch_size`` sequences.
        """
        return [
            [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples]
            for samples in self.generate_tokens(prompts, system_prompt)
        ]


def generate_answers(
    student: StudentSpec, model_dir: Path, prompts: list[str], system_prompt: str = ""
) -> list[list[str]]:
    """Load the student in ``model_dir`` and return K answers per prompt (see :meth:`StudentGenerator.generate`)."""
    return StudentGenerator.load(student, model_dir).generate(prompts, system_prompt)
