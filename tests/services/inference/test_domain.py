"""Inference domain on a quickly trained tiny student: batching, K samples, LoRA and full folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.contracts.spec import InferenceSpec, StudentSpec
from llamaduo.data.examples import Example
from llamaduo.services.inference import domain
from llamaduo.services.inference.domain import (
    BackendUnavailableError,
    GenerationStopped,
    StudentGenerator,
    choose_backend,
    every,
    generate_answers,
    load_generator,
)
from llamaduo.services.trainer.domain import train
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
ROWS = make_dataset(n_train=32, n_test=12)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
#: Prompts of different lengths, so a batch has real left padding.
PROMPTS = [r["instruction"] for r in ROWS if r["split"] == "test"] + ["Route this ticket: bug", "hi"]


def spec(method: str = "full", **inference: object) -> StudentSpec:
    return StudentSpec.model_validate({
        "base_model": "tiny:llama", "method": method,
        "training": {"epochs": 20, "learning_rate": 3e-3, "batch_size": 8, "max_length": 128},
        "inference": {"max_new_tokens": 8, **inference},
    })


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("full")
        train(spec(), TRAIN, SYSTEM, out)
        yield out


def test_batched_greedy_equals_one_by_one(full_dir: Path) -> None:
    batched = StudentGenerator.load(spec(batch_size=5), full_dir).generate_tokens(PROMPTS, SYSTEM)
    single = StudentGenerator.load(spec(batch_size=1), full_dir).generate_tokens(PROMPTS, SYSTEM)
    assert batched == single
    assert sum(len(ids[0]) > 0 for ids in batched) >= len(PROMPTS) // 2  # real answers, not just stops


def test_answers_are_decoded_new_tokens(full_dir: Path) -> None:
    answers = StudentGenerator.load(spec(batch_size=16), full_dir).generate(PROMPTS[:4], SYSTEM)
    assert len(answers) == 4 and all(len(a) == 1 for a in answers)
    for (answer,) in answers:
        assert answer == answer.strip() and "<|im_end|>" not in answer and "Route this ticket" not in answer


def test_k_samples_per_prompt(full_dir: Path) -> None:
    greedy = StudentGenerator.load(spec(samples_per_prompt=3), full_dir).generate(PROMPTS[:3], SYSTEM)
    assert [len(a) for a in greedy] == [3, 3, 3]
    assert all(len(set(a)) == 1 for a in greedy)  # greedy: the same answer K times

    sampled_spec = spec(samples_per_prompt=4, temperature=5.0, batch_size=6)
    first = StudentGenerator.load(sampled_spec, full_dir).generate(PROMPTS[:3], SYSTEM)
    again = StudentGenerator.load(sampled_spec, full_dir).generate(PROMPTS[:3], SYSTEM)
    assert [len(a) for a in first] == [4, 4, 4]
    assert first == again  # seeded
    assert any(len(set(a)) > 1 for a in first)  # a hot temperature gives different samples


def test_lora_student_loads_on_its_base(tmp_path: Path, full_dir: Path) -> None:
    out = tmp_path / "lora"
    train(spec("lora"), TRAIN[:8], SYSTEM, out)
    answers = generate_answers(spec("lora", samples_per_prompt=2), out, PROMPTS[:2], SYSTEM)
    assert [len(a) for a in answers] == [2, 2]


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: vLLM only when it can run; transformers always; explicit vllm that cannot run fails clearly."""
    assert choose_backend(InferenceSpec(backend="transformers")) == "transformers"
    monkeypatch.setattr(domain, "vllm_unavailable_reason", lambda: None)
    assert choose_backend(InferenceSpec(backend="auto")) == "vllm"
    assert choose_backend(InferenceSpec(backend="vllm")) == "vllm"
    assert choose_backend(InferenceSpec(backend="transformers")) == "transformers"
    monkeypatch.setattr(domain, "vllm_unavailable_reason", lambda: "no CUDA GPU is available (vLLM needs one)")
    assert choose_backend(InferenceSpec(backend="auto")) == "transformers"
    with pytest.raises(BackendUnavailableError) as err:
        choose_backend(InferenceSpec(backend="vllm"))
    assert "student.inference.backend" in str(err.value) and "no CUDA GPU" in str(err.value)


def test_this_machine_runs_transformers(full_dir: Path) -> None:
    """Here (no vLLM, no GPU) auto loads the transformers generator and an explicit vllm is refused, naming why."""
    import importlib.util

    import torch

    reason = domain.vllm_unavailable_reason()
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run on this machine")
    assert reason is not None
    if importlib.util.find_spec("vllm") is None:
        assert "'vllm' package is not installed" in reason and "llamaduo[vllm]" in reason
    generator = load_generator(spec(backend="auto"), full_dir)
    assert isinstance(generator, StudentGenerator)
    assert generator.generate(PROMPTS[:2], SYSTEM) == generate_answers(spec(), full_dir, PROMPTS[:2], SYSTEM)
    with pytest.raises(BackendUnavailableError, match=r"student\.inference\.backend is 'vllm'"):
        load_generator(spec(backend="vllm"), full_dir)


def test_generation_ends_early_when_should_stop_turns_true(full_dir: Path) -> None:
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    generator = StudentGenerator.load(spec(batch_size=16), full_dir)
    with pytest.raises(GenerationStopped):
        generator.generate(PROMPTS, SYSTEM, should_stop=stop)
    assert len(asked) == 3  # asked after the first and second new tokens (true), then once more: stopped


def test_every_asks_at_most_once_a_period_and_true_stays_true() -> None:
    answers = iter([False, True])
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        return next(answers)

    throttled = every(3600, check)
    assert [throttled() for _ in range(50)] == [False] * 50 and len(calls) == 1
    fast = every(0, check)
    assert fast() is True and fast() is True and len(calls) == 2
