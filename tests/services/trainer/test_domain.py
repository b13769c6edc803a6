"""Trainer domain on the tiny model: loss masking, full fine-tuning, LoRA save/reload, QLoRA, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.contracts.events import TrainProgress
from llamaduo.contracts.spec import StudentSpec
from llamaduo.data.examples import Example
from llamaduo.models.loading import STUDENT_META_FILE, read_student_meta
from llamaduo.services.trainer.domain import (
    TrainingStopped,
    build_dataset,
    build_trainer,
    export_merged,
    lora_rank,
    save_student,
    train,
)
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def triage_rows(n: int, **kwargs: object) -> list[Example]:
    rows = make_dataset(n_train=n, n_test=4, **kwargs)
    return [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in rows
            if r["split"] == "train"]


def spec(**overrides: object) -> StudentSpec:
    data: dict = {"base_model": "tiny:llama", "method": "full",
                  "training": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 4, "max_length": 128}}
    data.update(overrides)
    return StudentSpec.model_validate(data)


def test_lora_rank_follows_the_paper_schedule() -> None:
    assert lora_rank(100) == (8, 16)
    assert lora_rank(16_000) == (8, 16)
    assert lora_rank(20_000) == (16, 32)
    assert lora_rank(40_000) == (32, 64)
    assert lora_rank(100, r=4) == (4, 8)
    assert lora_rank(100, r=4, alpha=4) == (4, 4)


def test_dataset_is_conversational_prompt_completion() -> None:
    ds = build_dataset(triage_rows(2), SYSTEM)
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["completion"] == [{"role": "assistant", "content": triage_rows(2)[0].response}]
    assert [m["role"] for m in build_dataset(triage_rows(1), "")[0]["prompt"]] == ["user"]


def test_loss_is_on_the_assistant_turn_only(tmp_path: Path) -> None:
    rows = triage_rows(3)
    trainer, tokenizer, _ = build_trainer(spec(), rows, SYSTEM, tmp_path)
    for row, ex in zip(trainer.train_dataset, rows, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        trained = [i for i, label in enumerate(labels) if label != -100]
        assert trained == list(range(trained[0], len(ids)))  # one block at the end
        assert [labels[i] for i in trained] == [ids[i] for i in trained]
        assert tokenizer.decode(ids[trained[0]:]) == f"{ex.response}<|im_end|>\n"
        assert tokenizer.decode(ids[:trained[0]]).endswith("<|im_start|>assistant\n")


def test_full_fine_tuning_lowers_the_loss(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from llamaduo.models.resolve import resolve_base_model

    reports: list[TrainProgress] = []
    s = spec(training={"epochs": 6, "learning_rate": 3e-3, "batch_size": 8, "max_length": 128})
    result = train(s, triage_rows(32), SYSTEM, tmp_path / "out", progress=reports.append)
    assert result.rows == 32 and result.steps == 24 and result.method == "full"
    assert result.final_loss < result.first_loss / 2
    assert result.trainable_params > 100_000 and result.tokens_per_second > 0
    assert reports and reports[-1].step == reports[-1].total_steps == 24
    assert all(r.loss is not None for r in reports)
    before = load_file(Path(resolve_base_model("tiny:llama")) / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    changed = [k for k in before if not before[k].equal(after[k])]
    assert len(changed) == len(before)
    meta = read_student_meta(tmp_path / "out")
    assert meta.method == "full" and meta.base_model == "tiny:llama" and meta.quantization == "none"
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_lora_adapter_reloads_to_the_same_logits(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from llamaduo.models.loading import load_causal_lm
    from llamaduo.models.resolve import resolve_base_model

    s = spec(method="lora", lora={"r": 4, "dropout": 0.0},
             training={"epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "max_length": 128})
    trainer, tokenizer, meta = build_trainer(s, triage_rows(8), SYSTEM, tmp_path / "work")
    trainer.train()
    save_student(trainer, tokenizer, meta, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / STUDENT_META_FILE).read_text())["lora"] == {"r": 4, "alpha": 8}

    ids = tokenizer("Route this ticket: Hi, please check my invoice, thanks", return_tensors="pt").input_ids
    model = trainer.model.eval()
    with torch.no_grad():
        trained = model(ids.to(model.device)).logits.cpu()
        base = load_causal_lm(resolve_base_model("tiny:llama")).eval()
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
        again = reloaded(ids.to(reloaded.device)).logits.cpu()
        plain = load_causal_lm(resolve_base_model("tiny:llama")).eval()(ids).logits
    torch.testing.assert_close(again, trained)
    assert not torch.allclose(plain, trained)  # the adapter does something


def test_qlora_4bit_trains(tmp_path: Path) -> None:
    from llamaduo.models.loading import load_causal_lm
    from llamaduo.models.resolve import resolve_base_model

    try:
        load_causal_lm(resolve_base_model("tiny:llama"), "4bit")
    except Exception as err:  # bitsandbytes without a usable backend on this machine
        pytest.skip(f"bitsandbytes cannot load 4-bit here: {err}")
    s = spec(method="lora", quantization="4bit",
             training={"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_length": 128})
    result = train(s, triage_rows(12), SYSTEM, tmp_path / "out")
    assert result.steps == 3 and result.final_loss is not None and result.lora_r == 8
    assert 0 < result.trainable_params < 100_000
    assert read_student_meta(tmp_path / "out").quantization == "4bit"


def test_killed_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    s = spec(training={"epochs": 4, "learning_rate": 3e-3, "batch_size": 4, "max_length": 128})
    rows = triage_rows(8)  # 8 steps, a log (and progress report) at every step

    def killer(info: TrainProgress) -> None:
        if info.step >= 5:
            raise KeyboardInterrupt("killed")

    saved: list[str] = []

    def on_checkpoint(folder: Path) -> None:
        assert (folder / "trainer_state.json").is_file() and (folder / "optimizer.pt").is_file()
        saved.append(folder.name)

    with pytest.raises(KeyboardInterrupt):
        train(s, rows, SYSTEM, tmp_path / "out", progress=killer, checkpoint_dir=tmp_path / "ckpt",
              checkpoint_every_s=0, on_checkpoint=on_checkpoint)
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-4"]
    assert saved == [f"checkpoint-{i}" for i in range(1, 5)]  # the hook saw every checkpoint, once saved
    steps: list[int] = []
    result = train(s, rows, SYSTEM, tmp_path / "out", progress=lambda i: steps.append(i.step),
                   checkpoint_dir=tmp_path / "ckpt", checkpoint_every_s=0)
    assert result.steps == 8
    assert min(steps) >= 5  # started after the checkpoint, not from step 1
    assert (tmp_path / "out" / STUDENT_META_FILE).is_file()


def test_stop_request_saves_a_checkpoint_and_the_next_run_resumes(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    s = spec(training={"epochs": 4, "learning_rate": 3e-3, "batch_size": 4, "max_length": 128})
    rows = triage_rows(8)  # 8 steps
    seen: list[int] = []

    def progress(info: TrainProgress) -> None:
        seen.append(info.step)

    saved: list[str] = []
    asked: list[int] = []
    with pytest.raises(TrainingStopped) as stopped:  # checkpoints every hour: only the stop saves one
        train(s, rows, SYSTEM, tmp_path / "out", progress=progress, checkpoint_dir=tmp_path / "ckpt",
              checkpoint_every_s=3600, on_checkpoint=lambda f: saved.append(f.name),
              should_stop=lambda: asked.append(1) or len(asked) >= 3)  # asked after every step: true at the 3rd
    assert stopped.value.step == 3 and saved == ["checkpoint-3"]
    assert not (tmp_path / "out" / STUDENT_META_FILE).exists()  # a stopped run saves no student
    steps: list[int] = []
    with caplog.at_level("INFO", logger="llamaduo.services.trainer.domain"):
        result = train(s, rows, SYSTEM, tmp_path / "out", progress=lambda i: steps.append(i.step),
                       checkpoint_dir=tmp_path / "ckpt", checkpoint_every_s=3600, should_stop=lambda: False)
    assert "resuming training from checkpoint-3" in caplog.text
    assert result.steps == 8 and min(steps) >= 4


def test_merged_export_is_a_standalone_model_with_the_same_logits(tmp_path: Path) -> None:
    """The merged folder loads with plain transformers (no peft, no LlamaDuo metadata) and equals base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaduo.models.loading import load_causal_lm
    from llamaduo.models.resolve import resolve_base_model

    s = spec(method="lora", export_merged=True, lora={"r": 4, "dropout": 0.0},
             training={"epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "max_length": 128})
    train(s, triage_rows(8), SYSTEM, tmp_path / "adapter")
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", STUDENT_META_FILE}

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template  # the student's template travels with the model
    ids = tokenizer("Route this ticket: Hi, please check my invoice, thanks", return_tensors="pt").input_ids
    with torch.no_grad():
        base = load_causal_lm(resolve_base_model("tiny:llama")).eval()
        expected = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        got = merged(ids).logits
        plain = load_causal_lm(resolve_base_model("tiny:llama")).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected)  # the adapter is in there

    with pytest.raises(ValueError, match="only a LoRA adapter"):
        full = tmp_path / "full"
        full.mkdir()
        (full / STUDENT_META_FILE).write_text(json.dumps({"method": "full", "base_model": "tiny:llama"}))
        export_merged(full, tmp_path / "nope")
    with pytest.raises(ValueError, match="export_merged needs method 'lora'"):
        spec(method="full", export_merged=True)
