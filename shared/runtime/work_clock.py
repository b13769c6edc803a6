"""Timing a handler's work by stage, for the :class:`~llamaduo.contracts.events.WorkTime` of the event it
publishes (the stage split of a migration is read from those, see :mod:`llamaduo.reporting.timeline`).

A handler makes a :class:`WorkClock` when it starts and times its main work with ``clock.stage("train")``;
code deeper down (model loading, uploads) marks its own part with :func:`work_stage`, which finds the clock
through a context variable (``asyncio.to_thread`` carries it into the worker thread) and is a no-op when no
clock runs. A nested stage's time is taken out of the enclosing one; whatever the handler did outside any
stage is ``other``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from llamaduo.contracts.events import WorkTime

WorkStage = Literal["load", "train", "generate", "judge", "synthesize", "other"]

_current: ContextVar[WorkClock | None] = ContextVar("llamaduo_work_clock", default=None)


class WorkClock:
    """Seconds spent by stage since the clock was made; :meth:`work` closes the account."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[float] = []  # per open stage: seconds spent in stages nested in it

    @contextmanager
    def stage(self, name: WorkStage) -> Iterator[None]:
        """Count the block's time as ``name`` (less the time of stages nested in it)."""
        token = _current.set(self)
        began = time.monotonic()
        self._open.append(0.0)
        try:
            yield
        finally:
            nested = self._open.pop()
            spent = time.monotonic() - began
            self.seconds[name] += spent - nested
            if self._open:
                self._open[-1] += spent
            _current.reset(token)

    def work(self) -> WorkTime:
        """The account so far: each stage's seconds, and ``other`` = the rest of the time since the clock began."""
        elapsed = time.monotonic() - self.started
        timed = {k: round(v, 3) for k, v in self.seconds.items() if k != "other"}
        other = self.seconds.get("other", 0.0) + max(0.0, elapsed - sum(self.seconds.values()))
        return WorkTime(**timed, other=round(other, 3))


@contextmanager
def work_stage(name: WorkStage) -> Iterator[None]:
    """Count the block as ``name`` on the clock of the handler running it, if any (else just run it)."""
    clock = _current.get()
    if clock is None:
        yield
        return
    with clock.stage(name):
        yield
