"""Fine-tune a student on instruction/response rows: LoRA, QLoRA (4/8-bit) or full fine-tuning, with TRL.

The rows become a conversational prompt-completion dataset (prompt = system + user messages, completion =
the assistant message), so the loss is on the assistant turn only. The output folder holds the adapter
(LoRA) or the whole model (full), the tokenizer and ``llamaduo_student.json`` (:class:`StudentMeta`), which tells
inference how to load it. Heavy libraries are imported inside functions, so importing this module is fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import TrainProgress
from llamaduo.contracts.spec import StudentSpec, TrainingSpec
from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.models.loading import (
    LoraMeta,
    StudentMeta,
    load_causal_lm,
    load_student,
    load_tokenizer,
    read_student_meta,
    student_base_path,
    write_student_meta,
)
from llamaduo.models.resolve import resolve_base_model
from llamaduo.runtime.work_clock import work_stage
from llamaduo.services.trainer.callbacks import (
    checkpoint_callback,
    last_checkpoint,
    progress_callback,
    save_hook,
    stop_callback,
)
from llamaduo.services.trainer.rows import RowFit, chat_row, fit_rows

log = logging.getLogger(__name__)

#: With a checkpoint folder, a checkpoint is saved at most this often (a killed run loses less than this).
CHECKPOINT_EVERY_S = 60.0


class TrainingStopped(Exception):
    """Training stopped early because ``should_stop`` said so; the checkpoint saved at ``step`` (in the
    checkpoint folder) holds the progress, and a later run with the same folder resumes from it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped on request at step {step}; checkpoint-{step} holds the progress")
        self.step = step


class TrainResult(BaseModel):
    """What a finished training run did. ``rows``: the rows trained on; ``rows_too_long``: the rows left out for
    being longer than ``student.training.max_length`` (see :mod:`~llamaduo.services.trainer.rows`)."""

    rows: int
    rows_too_long: int = 0
    steps: int
    train_loss: float | None = None
    final_loss: float | None = None
    first_loss: float | None = None
    seconds: float
    tokens_per_second: float | None = None
    trainable_params: int
    method: str
    lora_r: int | None = None
    lora_alpha: int | None = None


def resolve_devices(training: TrainingSpec) -> int:
    """Training processes for ``student.training``: its ``devices``, 'auto' = the node's CUDA GPUs (1 without).

    Raises :class:`~llamaduo.errors.SpecError` when more devices than the node's GPUs are asked for on a CUDA
    node, or when ``sharding`` is asked for without CUDA (FSDP and ZeRO-3 run on GPUs only)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = max(1, gpus) if training.devices == "auto" else training.devices
    if gpus and devices > gpus:
        raise SpecError(f"student.training.devices is {devices} but this node has {gpus} GPU(s): lower it or "
                        "use 'auto'")
    if training.sharding != "none" and not gpus:
        raise SpecError(f"student.training.sharding {training.sharding!r} needs CUDA GPUs; this trainer has none "
                        "(use sharding: none, which trains data-parallel on CPU processes with gloo)")
    return devices


def _sharding_args(sharding: str) -> dict[str, Any]:
    """``TrainingArguments`` of ``student.training.sharding`` (transformers' FSDP2 / DeepSpeed integrations)."""
    if sharding == "fsdp":
        return {"fsdp": True, "fsdp_config": {  # a string for fsdp is deprecated in transformers 5
            "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True}}
    if sharding == "deepspeed_zero3":
        return {"deepspeed": {
            "zero_optimization": {"stage": 3, "overlap_comm": True,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto"}}
    return {}


def lora_rank(rows: int, r: int | None = None, alpha: int | None = None) -> tuple[int, int]:
    """LoRA ``(r, alpha)``: the given ones, else the paper's schedule by data size (8/16/32, alpha = 2r)."""
    if r is None:
        r = 8 if rows <= 16_000 else 16 if rows <= 32_000 else 32
    return r, alpha if alpha is not None else 2 * r


def build_dataset(examples: list[Example], system_prompt: str) -> Any:
    """Conversational prompt-completion ``datasets.Dataset`` of ``examples`` (rows as
    :func:`~llamaduo.services.trainer.rows.chat_row` builds them)."""
    from datasets import Dataset

    return Dataset.from_list([chat_row(ex, system_prompt) for ex in examples])


def build_trainer(
    student: StudentSpec,
    examples: list[Example],
    system_prompt: str,
    work_dir: Path,
    *,
    base_model_path: str | None = None,
    checkpoint_every_s: float | None = None,
    callbacks: list[Any] | None = None,
    fit: RowFit | None = None,
) -> tuple[Any, Any, StudentMeta]:
    """Build the TRL ``SFTTrainer`` for ``student`` (CPU-safe settings when there is no CUDA).

    Returns ``(trainer, tokenizer, meta)``; ``meta`` is what :func:`save_student` writes to
    ``llamaduo_student.json``. With ``checkpoint_every_s``, checkpoints go to ``work_dir`` that often (only the
    last one is kept). Rows longer than ``student.training.max_length`` are left out, and none fitting raises
    :class:`~llamaduo.services.trainer.rows.RowsTooLong` before the model is loaded (see
    :func:`~llamaduo.services.trainer.rows.fit_rows`); ``fit``: that rule already applied to ``examples`` (by
    :func:`train`, so the rows are tokenized once).
    """
    import torch
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    # newer transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    fields = SFTConfig.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if not examples:
        raise ValueError("training needs at least one example")
    from transformers import set_seed

    cfg = student.training
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1: a process of a torchrun group (distributed.py)
    set_seed(cfg.seed)  # the same adapter initialisation in every process, and with 1 or N processes
    base_path = base_model_path or resolve_base_model(student.base_model)
    tokenizer = load_tokenizer(base_path)
    tokenizer.padding_side = "right"
    examples = (fit or fit_rows(examples, system_prompt, tokenizer, cfg.max_length)).kept
    model = load_causal_lm(base_path, student.quantization)

    peft_config, r, alpha = None, None, None
    if student.method == "lora":
        from peft import LoraConfig

        r, alpha = lora_rank(len(examples), student.lora.r, student.lora.alpha)
        peft_config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=student.lora.dropout,
            target_modules=student.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        if student.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cuda)

    steps_per_epoch = max(1, math.ceil(len(examples) / (cfg.batch_size * cfg.gradient_accumulation_steps * world)))
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    args = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        packing=cfg.packing,
        warmup_steps=math.ceil(total_steps * cfg.warmup_fraction),
        lr_scheduler_type=cfg.lr_scheduler,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # bf16 and gradient checkpointing make CPU training an order of magnitude slower
        bf16=cuda and torch.cuda.is_bf16_supported(),
        **{checkpointing: cuda},
        logging_steps=max(1, total_steps // 20),
        logging_first_step=True,
        report_to="none",
        save_strategy="no",  # checkpoints are time-based, see checkpoint_callback
        save_total_limit=1,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        **({"ddp_backend": "nccl" if cuda else "gloo"} if world > 1 else {}),
        **(_sharding_args(cfg.sharding) if world > 1 else {}),
    )
    extra_callbacks = [] if checkpoint_every_s is None else [checkpoint_callback(checkpoint_every_s)]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=build_dataset(examples, system_prompt),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[*(callbacks or []), *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through callbacks, not stdout
    meta = StudentMeta(
        method=student.method,
        base_model=student.base_model,
        base_model_path=str(base_path),
        quantization=student.quantization,
        lora=LoraMeta(r=r, alpha=alpha) if r is not None and alpha is not None else None,
    )
    return trainer, tokenizer, meta


def save_student(trainer: Any, tokenizer: Any, meta: StudentMeta, output_dir: Path, *, weights: bool = True) -> None:
    """Save the adapter (LoRA) or whole model, the tokenizer and ``meta`` (``llamaduo_student.json``) to
    ``output_dir``. ``weights=False``: the weights are already there (``trainer.save_model`` of a sharded run)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if weights:
        trainer.model.save_pretrained(str(output_dir))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # what inference wants
    tokenizer.save_pretrained(str(output_dir))
    tokenizer.padding_side = side
    write_student_meta(output_dir, meta)


def export_merged(adapter_dir: Path, output_dir: Path, *, base_model_path: str | None = None) -> Path:
    """Save the LoRA student in ``adapter_dir`` merged into its base model, as a standalone model folder.

    ``output_dir`` gets what ``AutoModelForCausalLM.from_pretrained`` / vLLM need and nothing of LlamaDuo's:
    ``config.json``, safetensors weights, ``generation_config.json`` and the student's tokenizer (with its chat
    template). The base is always loaded unquantized for the merge: a QLoRA (4/8-bit) student's adapter is added
    to the full-precision base weights (bitsandbytes weights cannot be merged losslessly), so the merged model is
    the adapter on the unquantized base, not bit-identical to the quantized student the rounds evaluated.
    The merge runs in float32; the weights are then saved in the base's own dtype (float32 when it names none).
    ``base_model_path``: an already resolved base folder (default: resolve the base named in the metadata).
    """
    import torch

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    meta = read_student_meta(adapter_dir)
    if meta.method != "lora":
        raise ValueError(f"{adapter_dir} holds a {meta.method} student; only a LoRA adapter can be merged")
    base_path = Path(base_model_path or student_base_path(meta))
    config = json.loads((base_path / "config.json").read_text())
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    merged = load_student(adapter_dir, str(base_path), quantization="none")
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
        merged = merged.to(dtype)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer = load_tokenizer(adapter_dir)
    tokenizer.save_pretrained(str(output_dir))
    return output_dir


def train(
    student: StudentSpec,
    examples: list[Example],
    system_prompt: str,
    output_dir: Path,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    checkpoint_dir: Path | None = None,
    base_model_path: str | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune ``student`` on ``examples`` and save it to ``output_dir`` (see :func:`save_student`).

    Rows longer than ``student.training.max_length`` are left out and counted (``TrainResult.rows_too_long``);
    when none fits, :class:`~llamaduo.services.trainer.rows.RowsTooLong` is raised before any model is loaded.

    ``progress``: called with a :class:`TrainProgress` at each log step (about 20 per run) and at the end.
    ``checkpoint_dir``: save a checkpoint there every ``checkpoint_every_s`` seconds and resume from the last one
    present (a killed run resumes instead of starting over).
    ``on_checkpoint``: with ``checkpoint_dir``, called on the training thread with each checkpoint folder just
    saved (``checkpoint_dir/checkpoint-<step>``; the previous one is already deleted), e.g. to copy it off
    the machine. It runs before training goes on, so it should be quick.
    ``base_model_path``: an already resolved base model folder (default: :func:`resolve_base_model`).
    ``should_stop``: checked after every step; when it turns true (the service is shutting down) a checkpoint is
    saved, ``on_checkpoint`` gets it, and :class:`TrainingStopped` is raised instead of saving the student.
    ``should_cancel``: checked after every step too; when true (the migration was cancelled) training ends with
    nothing saved and :class:`~llamaduo.bus.cancellation.MigrationCancelled` is raised.

    With ``student.training.devices`` other than 1 (see :func:`resolve_devices`), training runs data-parallel in
    a torchrun process group (:mod:`~llamaduo.services.trainer.distributed`); every hook above keeps its meaning.
    """
    started = time.monotonic()
    losses: list[float] = []
    base_model_path = base_model_path or resolve_base_model(student.base_model)
    fit = fit_rows(examples, system_prompt, load_tokenizer(base_model_path), student.training.max_length)
    devices = resolve_devices(student.training)
    if devices > 1:
        from llamaduo.services.trainer.distributed import train_distributed

        return train_distributed(
            student, fit.kept, system_prompt, Path(output_dir), devices=devices, progress=progress,
            checkpoint_dir=checkpoint_dir, base_model_path=base_model_path, checkpoint_every_s=checkpoint_every_s,
            on_checkpoint=on_checkpoint, should_stop=should_stop, should_cancel=should_cancel,
            rows_too_long=len(fit.too_long))
    with tempfile.TemporaryDirectory(prefix="llamaduo-train-") as scratch:
        work_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(scratch)
        with work_stage("load"):
            trainer, tokenizer, meta = build_trainer(
                student,
                examples,
                system_prompt,
                work_dir,
                base_model_path=base_model_path,
                checkpoint_every_s=checkpoint_every_s if checkpoint_dir is not None else None,
                callbacks=[
                    progress_callback(progress, losses),
                    *([save_hook(on_checkpoint)] if on_checkpoint is not None and checkpoint_dir is not None else []),
                    stop_callback(should_stop or (lambda: False), should_cancel or (lambda: False)),
                ],
                fit=fit,
            )
        resume = last_checkpoint(checkpoint_dir)
        if resume:
            log.info("resuming training from %s", Path(resume).name)
        output = trainer.train(resume_from_checkpoint=resume)
        if should_cancel is not None and should_cancel():
            raise MigrationCancelled(f"training cancelled at step {trainer.state.global_step}")
        if should_stop is not None and trainer.state.global_step < trainer.state.max_steps and should_stop():
            raise TrainingStopped(trainer.state.global_step)
        save_student(trainer, tokenizer, meta, Path(output_dir))
    return train_result(trainer, output, meta, student, losses, started,
                        rows=len(fit.kept), rows_too_long=len(fit.too_long))


def train_result(trainer: Any, output: Any, meta: StudentMeta, student: StudentSpec, losses: list[float],
                 started: float, *, rows: int, rows_too_long: int) -> TrainResult:
    """The :class:`TrainResult` of a finished ``trainer.train()`` (``output``), timed from ``started``."""
    state = trainer.state
    runtime = float(output.metrics.get("train_runtime") or 0.0)
    return TrainResult(
        rows=rows,
        rows_too_long=rows_too_long,
        steps=state.global_step,
        train_loss=output.training_loss,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        seconds=time.monotonic() - started,
        tokens_per_second=state.num_input_tokens_seen / runtime if runtime > 0 else None,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        method=student.method,
        lora_r=meta.lora.r if meta.lora else None,
        lora_alpha=meta.lora.alpha if meta.lora else None,
    )
