"""Data-parallel training: ``student.training.devices`` processes in a torchrun group, driven from the trainer.

:func:`train_distributed` (the trainer's side) writes the job to a scratch folder and starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m llamaduo.services.trainer.distributed
<folder>`` in its own process group: torchrun, the launcher ``accelerate launch`` passes through to, with the
Trainer's accelerate integration doing the rest (DDP; FSDP2 or DeepSpeed ZeRO-3 with ``student.training.sharding``,
see :func:`~llamaduo.services.trainer.domain._sharding_args`; the gloo backend on CPU). Every rank builds the same
trainer (:func:`~llamaduo.services.trainer.domain.build_trainer`: same seed, so the same adapter initialisation,
and accelerate gives each rank its share of every global batch); rank 0 alone reports and saves.

The processes and the trainer talk through files in that folder:

- ``events.jsonl``: rank 0 appends a progress report or a saved checkpoint folder and waits until ``ack`` says the
  trainer handled it, so ``progress`` and ``on_checkpoint`` run before training goes on, as in-process;
- ``stop`` / ``cancel``: created by the trainer when ``should_stop`` / ``should_cancel`` turns true; after every
  step each rank looks, and the ranks agree (an all-reduce) so they all end at the same step;
- ``result.json``: rank 0's outcome (done with the :class:`~llamaduo.services.trainer.domain.TrainResult`,
  stopped or cancelled at a step); ``launch.log``: the group's output, quoted when it fails.

Checkpoints are the Trainer's (model and optimizer from rank 0, one RNG state per rank), so resume needs the same
number of devices; the adapter is saved once, by rank 0 (with sharding, every rank takes part in gathering it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import TrainProgress
from llamaduo.contracts.spec import StudentSpec
from llamaduo.data.examples import Example

log = logging.getLogger(__name__)

POLL_S = 0.02
#: How long rank 0 waits for the trainer to handle an event before going on without it.
ACK_TIMEOUT_S = 600.0


def train_distributed(
    student: StudentSpec,
    examples: list[Example],
    system_prompt: str,
    output_dir: Path,
    *,
    devices: int,
    progress: Callable[[TrainProgress], None] | None = None,
    checkpoint_dir: Path | None = None,
    base_model_path: str,
    checkpoint_every_s: float,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    rows_too_long: int = 0,
) -> Any:
    """:func:`~llamaduo.services.trainer.domain.train` on ``devices`` processes (same arguments, same outcome:
    a ``TrainResult``, :class:`~llamaduo.services.trainer.domain.TrainingStopped` or
    :class:`~llamaduo.bus.cancellation.MigrationCancelled`). ``examples``: rows that fit ``max_length``."""
    from llamaduo.services.trainer.domain import TrainingStopped, TrainResult

    with tempfile.TemporaryDirectory(prefix="llamaduo-ddp-") as scratch:
        job = Path(scratch)
        (job / "job.json").write_text(json.dumps({
            "student": student.model_dump(mode="json"),
            "examples": [ex.model_dump(mode="json") for ex in examples],
            "system_prompt": system_prompt,
            "output_dir": str(output_dir),
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
            "base_model_path": base_model_path,
            "checkpoint_every_s": checkpoint_every_s,
            "report_checkpoints": on_checkpoint is not None,
            "rows_too_long": rows_too_long,
        }))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
                   "-m", __name__, str(job)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        log.info("training on %d processes: %s", devices, " ".join(command))
        with open(job / "launch.log", "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            _drive(proc, job, progress, on_checkpoint, should_stop, should_cancel)
        except BaseException:
            _kill_group(proc)
            raise
        result_file = job / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = (job / "launch.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"data-parallel training on {devices} processes failed (exit {proc.returncode}):"
                               f"\n{tail}")
        result = json.loads(result_file.read_text())
    if result["status"] == "cancelled":
        raise MigrationCancelled(f"training cancelled at step {result['step']}")
    if result["status"] == "stopped":
        raise TrainingStopped(result["step"])
    return TrainResult.model_validate(result["result"])


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _drive(proc: subprocess.Popen, job: Path, progress: Callable[[TrainProgress], None] | None,
           on_checkpoint: Callable[[Path], None] | None, should_stop: Callable[[], bool] | None,
           should_cancel: Callable[[], bool] | None) -> None:
    """Until the group exits: hand rank 0's events to the hooks (acknowledging each) and raise the flags."""
    events, handled, offset = job / "events.jsonl", 0, 0
    while True:
        running = proc.poll() is None
        for flag, check in (("cancel", should_cancel), ("stop", should_stop)):
            if check is not None and not (job / flag).exists() and check():
                (job / flag).touch()
        if events.exists():
            with open(events, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            lines = chunk.split(b"\n")
            offset += len(chunk) - len(lines[-1])  # a line still being written waits for the next pass
            for line in lines[:-1]:
                event = json.loads(line)
                if event["kind"] == "progress" and progress is not None:
                    progress(TrainProgress.model_validate(event["progress"]))
                elif event["kind"] == "checkpoint" and on_checkpoint is not None:
                    on_checkpoint(Path(event["folder"]))
                handled += 1
                for flag, check in (("cancel", should_cancel), ("stop", should_stop)):
                    if check is not None and not (job / flag).exists() and check():
                        (job / flag).touch()
                tmp = job / "ack.tmp"
                tmp.write_text(str(handled))
                os.replace(tmp, job / "ack")
        if not running:
            return
        time.sleep(POLL_S)


# ---- inside each process of the group ------------------------------------------------------------------------


class _Rank0Channel:
    """Rank 0's side of ``events.jsonl`` / ``ack``."""

    def __init__(self, job: Path) -> None:
        self.job, self.sent = job, 0

    def send(self, event: dict[str, Any]) -> None:
        with open(self.job / "events.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
        self.sent += 1
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if int((self.job / "ack").read_text() or 0) >= self.sent:
                    return
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.005)
        log.warning("the trainer did not handle event %d within %.0f s; going on", self.sent, ACK_TIMEOUT_S)


def _group_callbacks(job: Path, rank: int, channel: _Rank0Channel | None, report_checkpoints: bool,
                     outcome: dict[str, Any]) -> list[Any]:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class _Flags(TrainerCallback):
        """After each step, every rank reads ``cancel`` / ``stop`` and the group agrees (max over ranks)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= state.max_steps:
                return
            flags = torch.tensor([(job / "cancel").exists(), (job / "stop").exists()], dtype=torch.int32)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                outcome.update(status="cancelled", step=state.global_step)
                control.should_training_stop = True
            elif flags[1]:
                outcome.update(status="stopped", step=state.global_step)
                control.should_save = True
                control.should_training_stop = True

    class _OnSave(TrainerCallback):
        """Every rank has written its part of the checkpoint (barrier), then rank 0 reports the folder."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if channel is not None and report_checkpoints and folder.is_dir():
                channel.send({"kind": "checkpoint", "folder": str(folder)})

    return [_Flags(), _OnSave()]


def run_rank(job: Path) -> None:
    """One process of the group (torchrun sets ``RANK`` / ``WORLD_SIZE``): train, and on rank 0 save and report."""
    from llamaduo.services.trainer.callbacks import last_checkpoint, progress_callback
    from llamaduo.services.trainer.domain import (
        build_trainer,
        save_student,
        train_result,
    )

    started = time.monotonic()
    spec = json.loads((job / "job.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    # The loss the Trainer logs in a group is world_size x the mean over the tokens of all ranks (each rank's loss
    # is scaled by the number of processes for average_tokens_across_devices; measured with transformers 5.24 /
    # TRL 1.16: step 1 of 2 processes logs 12.5348 where 1 process logs 6.2679): reports divide it back.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    student = StudentSpec.model_validate(spec["student"])
    examples = [Example.model_validate(row) for row in spec["examples"]]
    channel = _Rank0Channel(job) if rank == 0 else None
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None
    outcome: dict[str, Any] = {"status": "done"}
    losses: list[float] = []

    def report(info: TrainProgress) -> None:
        if channel is not None:
            if info.loss is not None:
                info = info.model_copy(update={"loss": info.loss / world})
            channel.send({"kind": "progress", "progress": info.model_dump(mode="json")})

    # every rank must name the same folder: the job's scratch one when there is no checkpoint folder
    work_dir = checkpoint_dir if checkpoint_dir is not None else job / "scratch"
    trainer, tokenizer, meta = build_trainer(
        student, examples, spec["system_prompt"], work_dir, base_model_path=spec["base_model_path"],
        checkpoint_every_s=spec["checkpoint_every_s"] if checkpoint_dir is not None else None,
        callbacks=[progress_callback(report, losses),
                   *_group_callbacks(job, rank, channel, spec["report_checkpoints"], outcome)],
    )
    resume = last_checkpoint(checkpoint_dir)
    output = trainer.train(resume_from_checkpoint=resume)
    if outcome["status"] == "done":
        if student.training.sharding != "none":
            # every rank takes part in gathering the sharded weights; the main process writes them
            trainer.save_model(spec["output_dir"])
        if rank == 0:
            save_student(trainer, tokenizer, meta, Path(spec["output_dir"]),
                         weights=student.training.sharding == "none")
            result = train_result(trainer, output, meta, student, [x / world for x in losses], started,
                                  rows=len(examples), rows_too_long=spec["rows_too_long"])
            if result.train_loss is not None:
                result = result.model_copy(update={"train_loss": result.train_loss / world})
            outcome["result"] = result.model_dump(mode="json")
            outcome["saved_by_rank"] = rank
    if rank == 0:
        tmp = job / "result.json.tmp"
        tmp.write_text(json.dumps(outcome))
        os.replace(tmp, job / "result.json")


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
