"""Rows longer than ``student.training.max_length`` on the tiny model: left out and counted, never truncated;
none fitting fails at once with a message naming the field."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.contracts.spec import StudentSpec
from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.models.loading import load_tokenizer
from llamaduo.models.resolve import resolve_base_model
from llamaduo.services.trainer import domain
from llamaduo.services.trainer.domain import build_trainer, train
from llamaduo.services.trainer.rows import RowsTooLong, fit_rows, token_lengths
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
#: a 40-word instruction: with the tiny byte-level tokenizer, well over 128 tokens
LONG_INSTRUCTION = (
    "Please read the following customer message carefully and decide which single support queue should handle "
    "it, taking into account the product, the billing history, the shipping status and any previous "
    "conversation with our agents before answering with the queue name"
)


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tokenizer(tiny_cache: None) -> object:
    return load_tokenizer(resolve_base_model("tiny:llama"))


def spec(max_length: int = 128, epochs: float = 1) -> StudentSpec:
    return StudentSpec.model_validate({
        "base_model": "tiny:llama", "method": "full",
        "training": {"epochs": epochs, "learning_rate": 3e-3, "batch_size": 4, "max_length": max_length}})


def triage_rows(n: int) -> list[Example]:
    return [Example(id=r["id"], instruction=r["instruction"], response=r["response"])
            for r in make_dataset(n_train=n, n_test=4) if r["split"] == "train"]


def long_rows(n: int) -> list[Example]:
    return [Example(id=f"long-{i}", instruction=f"{LONG_INSTRUCTION} ticket {i}", response="billing")
            for i in range(n)]


def test_no_row_fitting_max_length_fails_at_once_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: object
) -> None:
    rows = long_rows(16)
    assert len(LONG_INSTRUCTION.split()) == 40
    lengths = token_lengths(rows, SYSTEM, tokenizer)
    assert min(lengths) > 128

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for rows that cannot be trained")

    monkeypatch.setattr(domain, "load_causal_lm", no_model)
    with pytest.raises(SpecError) as caught:
        train(spec(128), rows, SYSTEM, tmp_path / "out")
    message = str(caught.value)
    assert isinstance(caught.value, RowsTooLong)
    assert message.startswith("student.training.max_length 128: all 16 training rows are longer")
    assert f"the shortest has {min(lengths)} tokens, the longest {max(lengths)}" in message
    assert f"raise student.training.max_length to at least {min(lengths)}" in message
    assert "'long-0'" in message
    assert not (tmp_path / "out").exists()


def test_an_answer_alone_longer_than_max_length_fails_naming_the_field(tmp_path: Path) -> None:
    row = Example(id="essay", instruction="Queue?", response=" ".join(["billing"] * 80))
    with pytest.raises(RowsTooLong, match=r"^student\.training\.max_length 64: the only training row is longer"):
        train(spec(64), [row], SYSTEM, tmp_path / "out")


def test_rows_longer_than_max_length_are_left_out_and_counted(tmp_path: Path, tokenizer: object) -> None:
    short = triage_rows(6)
    # too long by the prompt, and by the answer alone (the old truncation trained its first 128 tokens)
    essay = Example(id="essay", instruction="Queue?", response=" ".join(["billing"] * 80))
    rows = [*short[:3], *long_rows(3), essay, *short[3:]]
    limit = max(token_lengths(short, SYSTEM, tokenizer))  # a row of exactly max_length tokens fits
    assert limit < min(token_lengths([*long_rows(3), essay], SYSTEM, tokenizer))

    fit = fit_rows(rows, SYSTEM, tokenizer, limit)
    assert fit.kept == short and [rid for rid, _ in fit.too_long] == ["long-0", "long-1", "long-2", "essay"]
    assert "4 of 10 training rows are longer than student.training.max_length" in fit.summary()

    # the trainer trains on exactly the kept rows, whole: what TRL tokenized is what the rule measured
    trainer, _, _ = build_trainer(spec(limit), rows, SYSTEM, tmp_path / "work")
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert sorted(lengths) == sorted(token_lengths(short, SYSTEM, tokenizer))
    assert all(label != -100 for label in trainer.train_dataset[0]["labels"][-2:])  # the end of the answer

    result = train(spec(limit), rows, SYSTEM, tmp_path / "out")
    assert result.rows == 6 and result.rows_too_long == 4
    assert result.steps == 2  # 6 rows, batch 4, 1 epoch
