"""Answer test prompts with a trained student: batched, left-padded generation, K samples per prompt.

A student folder is what :func:`llamaduo.services.trainer.domain.train` saved: a LoRA adapter (loaded on
its base model) or a whole model, described by its ``llamaduo_student.json``. Heavy libraries are imported
inside functions, so importing this module is fast.

Two backends answer through one interface, :class:`Generator`: :class:`StudentGenerator` (transformers, any
machine) and :class:`VLLMGenerator` (vLLM's offline engine, CUDA only, the ``vllm`` extra).
:func:`load_generator` picks one from ``student.inference.backend`` (see :func:`choose_backend`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from llamaduo.contracts.spec import InferenceSpec, StudentSpec
from llamaduo.errors import ModelError
from llamaduo.models.generation import chat_prompt_ids, chat_text, cut_at_stop, generate_new_tokens, stop_token_ids
from llamaduo.models.loading import load_student, load_tokenizer, read_student_meta, student_base_path

#: LoRA ranks vLLM's engine can be configured for (``max_lora_rank``), smallest first.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Generator(Protocol):
    """A loaded student answering prompts, whatever engine runs it."""

    def generate(self, prompts: list[str], system_prompt: str = "", *,
                 should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        """K = ``samples_per_prompt`` stripped answers per prompt, in the prompts' order. When ``should_stop()``
        turns true, generation ends early and :class:`GenerationStopped` is raised (no partial answers)."""
        ...


class BackendUnavailableError(ModelError):
    """The spec asks for an inference backend this machine cannot run."""


class GenerationStopped(Exception):
    """Generation ended early because the caller's ``should_stop()`` turned true; its answers are not given."""


def every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """``check``, asked at most once per ``seconds`` (the last answer in between); true stays true."""
    import time

    asked_at, answer = float("-inf"), False

    def throttled() -> bool:
        nonlocal asked_at, answer
        now = time.monotonic()
        if not answer and now - asked_at >= seconds:
            asked_at, answer = now, check()
        return answer

    return throttled


def vllm_unavailable_reason() -> str | None:
    """None when vLLM can run here, else why not (not installed, or no CUDA GPU)."""
    if importlib.util.find_spec("vllm") is None:
        return "the 'vllm' package is not installed (pip install 'llamaduo[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is available (vLLM needs one)"
    return None


def choose_backend(inference: InferenceSpec) -> Literal["transformers", "vllm"]:
    """The backend that runs ``inference``: ``auto`` is vLLM when it can run here, else transformers.

    ``vllm`` asked for explicitly and unable to run is a :class:`BackendUnavailableError` (no silent fallback).
    """
    if inference.backend == "transformers":
        return "transformers"
    reason = vllm_unavailable_reason()
    if reason is None:
        return "vllm"
    if inference.backend == "vllm":
        raise BackendUnavailableError(
            f"student.inference.backend is 'vllm' but vLLM cannot run here: {reason}; "
            "use backend 'transformers' or 'auto'"
        )
    return "transformers"


def load_generator(
    student: StudentSpec, model_dir: Path, *, base_model_path: str | None = None
) -> Generator:
    """Load the student saved in ``model_dir`` with the backend :func:`choose_backend` picks."""
    if choose_backend(student.inference) == "vllm":
        return VLLMGenerator.load(student, model_dir, base_model_path=base_model_path)
    return StudentGenerator.load(student, model_dir, base_model_path=base_model_path)


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

        ``base_model_path``: an already resolved base model folder for a LoRA student (default: the base model
        named in the folder's metadata, see :func:`~llamaduo.models.loading.student_base_path`).
        """
        tokenizer = load_tokenizer(model_dir)
        model = load_student(Path(model_dir), base_model_path)
        return cls(model, tokenizer, student.inference, seed=student.training.seed)

    def _stop_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer)

    def _generate_batch(self, texts: list[str], sample: bool,
                        should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """New token ids for each text, cut at the first stop token."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        stop = self._stop_ids()
        rows = generate_new_tokens(
            self.model, enc, max_new_tokens=self.inference.max_new_tokens, stop_ids=stop,
            pad_token_id=self.tokenizer.pad_token_id, temperature=self.inference.temperature if sample else 0.0,
            should_stop=(lambda _ids: should_stop()) if should_stop is not None else None,
        )  # fmt: skip
        if should_stop is not None and should_stop():
            raise GenerationStopped("generation stopped early: should_stop() turned true")
        return [cut_at_stop(row, stop)[0] for row in rows]

    def generate_tokens(self, prompts: list[str], system_prompt: str = "", *,
                        should_stop: Callable[[], bool] | None = None) -> list[list[list[int]]]:
        """Like :meth:`generate`, as token ids (new tokens only, up to the first stop token)."""
        import torch

        k = self.inference.samples_per_prompt
        sample = self.inference.temperature > 0
        texts = [chat_text(self.tokenizer, p, system_prompt) for p in prompts]
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
            answers = self._generate_batch([jobs[i] for i in batch], sample, should_stop)
            for i, ids in zip(batch, answers, strict=True):
                flat[i] = ids
        if sample:
            return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
        return [[ids] * k for ids in flat]

    def generate(self, prompts: list[str], system_prompt: str = "", *,
                 should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        """K = ``samples_per_prompt`` answers per prompt, stripped (greedy at temperature 0, else seeded sampling).

        Prompts are chat-formatted with the student's template, left-padded and generated in batches of
        ``inference.batch_size`` sequences. ``should_stop``: asked after every new token (throttle it, see
        :func:`every`); when true the batch ends and :class:`GenerationStopped` is raised.
        """
        return [
            [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples]
            for samples in self.generate_tokens(prompts, system_prompt, should_stop=should_stop)
        ]


class VLLMGenerator:
    """A student loaded in vLLM's offline engine (``vllm.LLM``). Build it with :meth:`load`; needs CUDA.

    A LoRA student runs as a ``LoRARequest`` on its base model (``enable_lora``, ``max_lora_rank`` from the
    adapter's config); a 4-bit base is quantized in flight with bitsandbytes, an 8-bit one is loaded unquantized.
    Prompts are the same chat-template token ids as :class:`StudentGenerator`'s; answers are cut at the same stop
    tokens and stripped. Greedy decoding (temperature 0) generates once and repeats the answer K times; sampling
    asks vLLM for ``n = K`` seeded samples per prompt.
    """

    def __init__(
        self, llm: Any, tokenizer: Any, inference: InferenceSpec, seed: int = 0, lora_request: Any | None = None
    ) -> None:
        self.llm, self.tokenizer, self.inference, self.seed = llm, tokenizer, inference, seed
        self.lora_request = lora_request

    @classmethod
    def load(cls, student: StudentSpec, model_dir: Path, *, base_model_path: str | None = None) -> VLLMGenerator:
        """Load the student saved in ``model_dir`` into a vLLM engine (see the class docstring)."""
        from vllm import LLM

        model_dir = Path(model_dir)
        meta = read_student_meta(model_dir)
        seed = student.training.seed
        lora_request = None
        if meta.method == "lora":
            from vllm.lora.request import LoRARequest

            rank = int(json.loads((model_dir / "adapter_config.json").read_text())["r"])
            max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
            if max_rank is None:
                raise BackendUnavailableError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this one is {rank}")
            quantization = {"quantization": "bitsandbytes"} if meta.quantization == "4bit" else {}
            llm = LLM(
                model=base_model_path or student_base_path(meta), tokenizer=str(model_dir),
                enable_lora=True, max_lora_rank=max_rank, max_loras=1, seed=seed, **quantization,
            )  # fmt: skip
            lora_request = LoRARequest("student", 1, str(model_dir))
        else:
            llm = LLM(model=str(model_dir), seed=seed)
        return cls(llm, load_tokenizer(model_dir), student.inference, seed=seed, lora_request=lora_request)

    def generate(self, prompts: list[str], system_prompt: str = "", *,
                 should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        """K = ``samples_per_prompt`` answers per prompt, stripped (see the class docstring). ``should_stop`` is
        asked before the engine runs (vLLM answers a shard in seconds) and after."""
        from vllm import SamplingParams

        if should_stop is not None and should_stop():
            raise GenerationStopped("generation not started: should_stop() is true")

        k = self.inference.samples_per_prompt
        sample = self.inference.temperature > 0
        params = SamplingParams(
            n=k if sample else 1, temperature=self.inference.temperature, top_p=1.0, top_k=-1,
            max_tokens=self.inference.max_new_tokens, seed=self.seed if sample else None,
            stop_token_ids=stop_token_ids(self.tokenizer), skip_special_tokens=True,
        )  # fmt: skip
        requests = [{"prompt_token_ids": chat_prompt_ids(self.tokenizer, p, system_prompt)} for p in prompts]
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        if should_stop is not None and should_stop():
            raise GenerationStopped("generation stopped: should_stop() turned true")
        answers = [[c.text.strip() for c in out.outputs] for out in outputs]
        return answers if sample else [a * k for a in answers]


def generate_answers(
    student: StudentSpec, model_dir: Path, prompts: list[str], system_prompt: str = ""
) -> list[list[str]]:
    """Load the student in ``model_dir`` (backend per :func:`load_generator`) and return K answers per prompt."""
    return load_generator(student, model_dir).generate(prompts, system_prompt)
