"""Inference domain on a quickly trained tiny student: batching, K samples, LoRA and full folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.examples import Example
from llamaduo.services.inference.domain import StudentGenerator, generate_answers
from llamaduo.services.trainer.domain import train
from llamaduo.spec import StudentSpec
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
