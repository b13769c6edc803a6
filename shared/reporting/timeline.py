"""Where a migration's wall time went, read from its events.

Every service reports the work behind the event it publishes (:class:`~llamaduo.contracts.events.WorkTime`:
model load, training, generation, judging, synthesis, other handler work), ending when the event was published.
Laid on the migration's wall clock (``migration.start`` to its terminal event), those spans split the wall
time by stage; an instant when several stages ran at once (judging beside generation, a late shard beside the
next round's training) is shared equally between them, so the shares add up to the wall time. An instant
covered by no reported work is **bus or idle**: events in flight, a service waiting for its next message, and
the controller's own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from pydantic import BaseModel, Field

from llamaduo.contracts.events import TERMINAL_SUBJECTS, Envelope, Subject

#: The stages a :class:`~llamaduo.contracts.events.WorkTime` reports, in the order laid out within one event's
#: span (a handler reads its inputs, loads what it needs, then works).
STAGES = ("other", "load", "train", "generate", "judge", "synthesize")
IDLE = "bus_idle"


@dataclass(frozen=True)
class Span:
    """``stage`` ran from ``start`` to ``end`` (POSIX seconds), reported by an event of ``subject``."""

    stage: str
    start: float
    end: float
    subject: str


class StageSplit(BaseModel):
    """A migration's wall time split by stage (see the module docstring)."""

    wall_seconds: float = Field(description="migration.start to the terminal event")
    seconds: dict[str, float] = Field(description="Wall seconds by stage, overlaps shared, plus 'bus_idle'")
    shares: dict[str, float] = Field(description="seconds / wall_seconds, by stage")
    busy_seconds: dict[str, float] = Field(description="Each stage's own total (overlaps counted in each)")
    overlap_seconds: float = Field(description="Wall seconds during which two or more stages ran")

    @property
    def idle_share(self) -> float:
        return self.shares.get(IDLE, 0.0)


def spans_of(env: Envelope) -> list[Span]:
    """The reported work of one event as spans, its stages back to back, ending at its ``occurred_at``."""
    work = getattr(env.payload, "work", None)
    if work is None:
        return []
    spans: list[Span] = []
    start = env.occurred_at.timestamp() - work.total
    for stage in STAGES:
        seconds = getattr(work, stage)
        if seconds > 0:
            spans.append(Span(stage, start, start + seconds, str(env.type)))
            start += seconds
    return spans


def work_spans(events: Iterable[Envelope]) -> list[Span]:
    """The reported work of ``events`` as spans (see :func:`spans_of`)."""
    return [span for env in events for span in spans_of(env)]


class Timeline:
    """One migration's work spans and its start and end, gathered event by event (a follower keeps these few
    numbers, not the events), split by stage once it has ended."""

    def __init__(self, events: Iterable[Envelope] = ()) -> None:
        self.spans: list[Span] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        for env in events:
            self.add(env)

    def add(self, env: Envelope) -> None:
        if env.type == Subject.MIGRATION_START:
            self.starts.append(env.occurred_at.timestamp())
        elif env.type in TERMINAL_SUBJECTS:
            self.ends.append(env.occurred_at.timestamp())
        self.spans.extend(spans_of(env))

    def split(self) -> StageSplit:
        """The wall time by stage. Raises ``ValueError`` without a ``migration.start`` or a terminal event (the
        migration must have ended)."""
        if not self.starts or not self.ends:
            raise ValueError("a stage split needs the migration's migration.start and its terminal event")
        begin, finish = min(self.starts), max(self.ends)
        spans = [s for s in self.spans if s.end > begin and s.start < finish]
        cuts = sorted({begin, finish, *(min(max(t, begin), finish) for s in spans for t in (s.start, s.end))})
        seconds = dict.fromkeys((*STAGES, IDLE), 0.0)
        overlap = 0.0
        for a, b in pairwise(cuts):
            middle = (a + b) / 2
            active = [s.stage for s in spans if s.start <= middle < s.end]
            if not active:
                seconds[IDLE] += b - a
                continue
            if len(active) > 1:
                overlap += b - a
            for stage in active:
                seconds[stage] += (b - a) / len(active)
        busy = dict.fromkeys(STAGES, 0.0)
        for s in spans:
            busy[s.stage] += min(s.end, finish) - max(s.start, begin)
        wall = finish - begin
        return StageSplit(
            wall_seconds=round(wall, 3),
            seconds={k: round(v, 3) for k, v in seconds.items()},
            shares={k: round(v / wall, 4) if wall > 0 else 0.0 for k, v in seconds.items()},
            busy_seconds={k: round(v, 3) for k, v in busy.items()},
            overlap_seconds=round(overlap, 3),
        )


def stage_split(events: Iterable[Envelope]) -> StageSplit:
    """Split the wall time of one migration's ``events`` (in any order) by stage (see :meth:`Timeline.split`)."""
    return Timeline(events).split()


def duration(seconds: float) -> str:
    """``287.4`` -> ``'4 min 47 s'``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def describe_split(split: StageSplit) -> str:
    """One line: the wall time, then each stage's share, largest first (stages with no time left out)."""
    named = {IDLE: "bus/idle"}
    parts = [f"{named.get(k, k)} {100 * v:.1f}%"
             for k, v in sorted(split.shares.items(), key=lambda kv: -kv[1]) if v > 0 or k == IDLE]
    return f"{duration(split.wall_seconds)} from start to end: " + ", ".join(parts)
