"""The Trainer callbacks of a training run: progress reports, time-based checkpoints, stop and cancel on request,
and the hand-over of each saved checkpoint (used by :mod:`.domain` in one process and by :mod:`.distributed` on
every rank)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaduo.contracts.events import TrainProgress


def progress_callback(progress: Callable[[TrainProgress], None] | None, losses: list[float]) -> Any:
    """A callback reporting step, loss, tokens/s and ETA to ``progress`` (losses logged go to ``losses``)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """Reports step, loss, tokens/s and ETA at every log event and at the end."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start, self.start_step = time.monotonic(), state.global_step
            self.start_tokens = state.num_input_tokens_seen
            self.reported = -1

        def _report(self, state: Any) -> None:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            done = state.global_step - self.start_step
            eta = (state.max_steps - state.global_step) * elapsed / done if done else None
            tps = (state.num_input_tokens_seen - self.start_tokens) / elapsed
            self.reported = state.global_step
            progress(
                TrainProgress(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    loss=losses[-1] if losses else None,
                    tokens_per_second=tps,
                    eta_seconds=eta,
                )
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress is not None:
                    self._report(state)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if progress is not None and self.reported != state.global_step:
                self._report(state)

    return _Progress()


def checkpoint_callback(every_s: float) -> Any:
    """A callback asking for a checkpoint every ``every_s`` seconds."""
    from transformers import TrainerCallback

    class _CheckpointEvery(TrainerCallback):
        """Asks for a checkpoint when ``every_s`` seconds have passed since the last one (or the start)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() - self.last >= every_s and state.global_step < state.max_steps:
                control.should_save = True
                self.last = time.monotonic()

    return _CheckpointEvery()


def stop_callback(should_stop: Callable[[], bool], should_cancel: Callable[[], bool]) -> Any:
    """A callback ending training after a step when cancelled (nothing saved) or asked to stop (checkpoint)."""
    from transformers import TrainerCallback

    class _StopOnRequest(TrainerCallback):
        """After a step: ``should_cancel()``: end training, nothing saved; ``should_stop()``: checkpoint, end."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step < state.max_steps and should_cancel():
                control.should_training_stop = True
            elif state.global_step < state.max_steps and should_stop():
                control.should_save = True
                control.should_training_stop = True

    return _StopOnRequest()


def save_hook(on_checkpoint: Callable[[Path], None]) -> Any:
    """A callback handing each saved checkpoint folder to ``on_checkpoint``."""
    from transformers import TrainerCallback

    class _OnSave(TrainerCallback):
        """Hands each saved checkpoint folder (``<output_dir>/checkpoint-<step>``) to ``on_checkpoint``."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                on_checkpoint(folder)

    return _OnSave()


def last_checkpoint(checkpoint_dir: Path | None) -> str | None:
    """The newest ``checkpoint-N`` folder under ``checkpoint_dir``, if any (what a resumed run starts from)."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir))
