"""The real student: LoRA on SmolLM2-135M learns the invoice task from 32 rows (CPU, a few minutes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.data.examples import Example
from llamaduo.data.scoring import score_answer
from llamaduo.data.text import parse_json_object
from llamaduo.tasks.invoice import make_dataset

SYSTEM = "You extract invoice fields. Answer with compact JSON only."
ROWS = make_dataset(n_train=32, n_test=10)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
TEST = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
        if r["split"] == "test"]


def scores(answers: list[list[str]]) -> tuple[int, float]:
    """(exact matches: the same JSON object as the reference, mean field similarity 1..100)."""
    exact = sum(parse_json_object(a) is not None and parse_json_object(a) == parse_json_object(e.response)
                for e, (a,) in zip(TEST, answers, strict=True))
    similarity = sum(score_answer(e.response, a)[0] for e, (a,) in zip(TEST, answers, strict=True)) / len(TEST)
    return exact, similarity


@pytest.mark.slow
def test_lora_on_smollm2_learns_the_invoice_task(tmp_path: Path) -> None:
    from llamaduo.contracts.spec import StudentSpec
    from llamaduo.models.loading import load_causal_lm, load_tokenizer
    from llamaduo.models.resolve import ModelResolutionError, resolve_base_model
    from llamaduo.services.inference.domain import StudentGenerator
    from llamaduo.services.trainer.domain import train

    try:
        base = resolve_base_model("smollm2-135m")
    except ModelResolutionError as err:
        pytest.skip(str(err))
    spec = StudentSpec.model_validate({
        "base_model": "smollm2-135m", "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "training": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 4, "max_length": 384},
        "inference": {"max_new_tokens": 80, "batch_size": 10},
    })
    started = time.monotonic()
    untrained = StudentGenerator(load_causal_lm(base).eval(), load_tokenizer(base), spec.inference)
    before = scores(untrained.generate([e.instruction for e in TEST], SYSTEM))
    del untrained

    result = train(spec, TRAIN, SYSTEM, tmp_path / "student", base_model_path=base)
    assert result.steps == 16 and result.lora_r == 16
    assert result.final_loss < result.first_loss / 4

    trained = StudentGenerator.load(spec, tmp_path / "student", base_model_path=base)
    after = scores(trained.generate([e.instruction for e in TEST], SYSTEM))
    print(f"untrained {before}, trained {after}, train {result.seconds:.0f} s, "
          f"total {time.monotonic() - started:.0f} s")
    assert after[0] > before[0] and after[0] >= 2  # exact matches
    assert after[1] >= before[1] + 40  # field similarity, 1..100
