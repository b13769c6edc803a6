"""Data-parallel training (``student.training.devices: 2``) on CPU: two gloo processes against one.

Same rows, same seed (so the same adapter initialisation and the same shuffled order) and the same global
batch: 1 process x batch 4 against 2 processes x batch 2. Accelerate hands each rank alternate per-device
batches of the one shuffled order, so every step sees the same 4 rows in both runs, and the Trainer averages
the loss over the tokens of all ranks (``average_tokens_across_devices``). Measured: step 1 agrees to 1e-4, the
worst step differs by 1.0% (float summation order across two processes, the padding of two half batches, and
the Adam updates compounding them); LOSS_TOL is twice that. Before the group's logged loss was divided by the
world size (distributed.py) this test failed with a 102% gap.
LoRA dropout is 0, since each rank draws its own dropout masks.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from llamaduo.contracts.events import TrainProgress
from llamaduo.contracts.spec import StudentSpec
from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.services.trainer.domain import TrainingStopped, _sharding_args, resolve_devices, train
from llamaduo.tasks.triage import make_dataset

pytestmark = pytest.mark.slow

SYSTEM = "Route the ticket to one queue."
#: Largest allowed |loss(2 processes) - loss(1 process)| at a step, relative to the 1-process loss.
LOSS_TOL = 0.02


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def rows(n: int) -> list[Example]:
    data = make_dataset(n_train=n, n_test=4)
    return [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in data
            if r["split"] == "train"]


def student(devices: int, batch_size: int) -> StudentSpec:
    return StudentSpec.model_validate({
        "base_model": "tiny:llama", "method": "lora", "lora": {"dropout": 0.0},
        "training": {"epochs": 2, "learning_rate": 3e-3, "batch_size": batch_size, "max_length": 128,
                     "devices": devices}})


def test_two_processes_follow_one_save_once_and_resume(tmp_path: Path) -> None:
    data = rows(16)  # 2 epochs x 16 rows / global batch 4 = 8 steps, each one logged
    one: dict[int, float] = {}
    single = train(student(1, 4), data, SYSTEM, tmp_path / "one",
                   progress=lambda p: one.__setitem__(p.step, p.loss))

    two: dict[int, float] = {}
    saved: list[Path] = []

    def report(p: TrainProgress) -> None:
        two[p.step] = p.loss

    checkpoints, out = tmp_path / "checkpoints", tmp_path / "two"
    with pytest.raises(TrainingStopped) as stopped:  # the service shutting down after step 3
        train(student(2, 2), data, SYSTEM, out, progress=report, checkpoint_dir=checkpoints,
              on_checkpoint=saved.append, should_stop=lambda: max(two, default=0) >= 3)
    assert 3 <= stopped.value.step < 8
    assert saved == [checkpoints / f"checkpoint-{stopped.value.step}"]
    assert (saved[0] / "rng_state_1.pth").is_file()  # rank 1's part is in the folder handed over
    assert not out.exists()

    resumed = train(student(2, 2), data, SYSTEM, out, progress=report, checkpoint_dir=checkpoints)
    assert resumed.steps == single.steps == 8
    assert sorted(two) == sorted(one)
    worst = max(abs(two[s] - one[s]) / one[s] for s in one)
    print(f"1 process: {[round(one[s], 4) for s in sorted(one)]}")
    print(f"2 processes: {[round(two[s], 4) for s in sorted(two)]}; worst relative gap {worst:.2e}")
    assert worst <= LOSS_TOL
    assert one[8] < one[1] * 0.95  # it learned something: the comparison is not of two flat lines

    # the adapter is saved once: one adapter folder besides the checkpoints
    adapters = sorted(p.parent for p in tmp_path.rglob("adapter_model.safetensors") if checkpoints not in p.parents)
    assert adapters == [tmp_path / "one", out]
    assert (out / "llamaduo_student.json").is_file()


@pytest.mark.parametrize("sharding", ["fsdp", "deepspeed_zero3"])
def test_sharding_is_refused_without_cuda_and_its_arguments_are_transformers_own(sharding: str) -> None:
    import torch
    from transformers import TrainingArguments

    training = student(2, 2).training.model_copy(update={"sharding": sharding})
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="needs CUDA GPUs"):
            resolve_devices(training)
    if sharding == "fsdp":  # deepspeed's needs the deepspeed package
        args = TrainingArguments(output_dir="unused", **_sharding_args(sharding))
        assert args.fsdp_config["version"] == 2
    assert resolve_devices(student(2, 2).training) == 2
