"""What a person watching a migration sees: one line per event, or a live rich view.

:class:`MigrationView` folds a migration's events (as :func:`llamaduo.bus.client.follow` yields them) into
what matters while it runs: round and stage, training step / loss / tokens per second / ETA, answers
judged so far against the round's total with an ETA from the judging rate, the running score of the
round, and the service-LLM tokens and cost spent. It keeps no connection and reads no clock of its own
(``clock`` is injectable), so it is tested by feeding it events. :class:`LiveProgress` draws it with
``rich.live`` on a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from llamaduo.contracts.events import CANCELLED_REASON, Envelope, Score, Stage, Subject, Usage, outcome_of


def describe(env: Envelope) -> str:
    """One human line for an event (the non-terminal view prints these)."""
    p, t = env.payload, env.type
    if t == Subject.MIGRATION_PROGRESS:
        extra = f" {p.judged}/{p.to_judge}" if p.to_judge else (f" judged {p.judged}" if p.judged else "")
        return f"{p.stage}{(' ' + p.detail) if p.detail else ''}{extra}"
    if t == Subject.TRAIN_PROGRESS:
        loss = f" loss {p.loss:.3f}" if p.loss is not None else ""
        return f"training step {p.step}/{p.total_steps}{loss}"
    if t == Subject.TRAIN_DONE:
        return f"trained on {p.rows} rows in {p.seconds:.0f}s (loss {p.train_loss})"
    if t == Subject.INFER_DONE:
        return f"answered {p.prompts} test prompts x{p.samples_per_prompt}"
    if t == Subject.EVAL_SCORED:
        which = "holdout batch" if p.split == "holdout" else "batch"
        return f"judged {which} {p.batch + 1}/{p.batches} ({p.provider}, {p.usage.tokens} tokens)"
    if t == Subject.SYNTH_READY:
        return f"synthesized {p.generated}, kept {p.kept}, removed {p.removed} ({p.provider})"
    if t == Subject.MIGRATION_COMPLETED:
        return f"completed: model {p.model.key}"
    if t == Subject.MIGRATION_FAILED and p.reason == CANCELLED_REASON:
        kept = f"best round {p.best_round} kept: {p.best_model.key}" if p.best_model else "no model kept"
        return f"{p.detail or 'cancelled'}; {kept}"
    if t == Subject.MIGRATION_FAILED:
        return f"failed: {p.reason}: {p.detail}"
    if t == Subject.ROUTE_CHANGED:
        share = f" {p.percent:g}%" if p.mode == "canary" else ""
        return f"route {p.route}: {p.mode}{share} version {p.version} ({p.reason})"
    if t == Subject.ROUTE_FALLBACK:
        return f"route {p.route}: answered upstream ({p.reason})"
    return str(t)


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when unknown."""
    if seconds is None or seconds < 0:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Round:
    number: int
    train_rows: int | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_second: float | None = None
    train_eta: float | None = None
    train_seconds: float | None = None
    to_judge: int | None = None
    judge_started: float | None = None
    scores: dict[str, Score] = field(default_factory=dict)

    @property
    def judged(self) -> int:
        return len(self.scores)

    def mean(self, metric: str) -> float | None:
        values = [getattr(s, metric) for s in self.scores.values() if not s.failed and getattr(s, metric)]
        return sum(values) / len(values) if values else None


class MigrationView:
    """The live state of one migration, folded from its events (duplicates are ignored by event id)."""

    def __init__(self, migration_id: str, *, gate: str = "similarity_mean", threshold: float | None = None,
                 max_rounds: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.migration_id = migration_id
        self.gate = gate
        self.threshold = threshold
        self.max_rounds = max_rounds
        self.clock = clock
        self.started = clock()
        self.stage = "starting"
        self.detail = ""
        self.rounds: dict[int, _Round] = {}
        self.usage = Usage()
        self.outcome: str | None = None
        self._seen: set[str] = set()

    @property
    def round(self) -> int:
        return max(self.rounds, default=0)

    def _round(self, number: int) -> _Round:
        return self.rounds.setdefault(number, _Round(number))

    def apply(self, env: Envelope) -> bool:
        """Take one event into the view; False when it was already seen (a redelivery)."""
        if env.event_id in self._seen:
            return False
        self._seen.add(env.event_id)
        p, t, rnd = env.payload, env.type, self._round(env.round)
        if t == Subject.MIGRATION_PROGRESS:
            self.stage, self.detail = str(p.stage), p.detail
            if p.to_judge and p.stage not in (Stage.HOLDOUT, Stage.BASELINE):  # the round's own answers only
                rnd.to_judge = p.to_judge
            if p.stage == "judging" and rnd.judge_started is None:
                rnd.judge_started = self.clock()
        elif t == Subject.TRAIN_REQUEST:
            rnd.train_rows = p.rows
        elif t == Subject.TRAIN_PROGRESS:
            self.stage = "training"
            rnd.step, rnd.total_steps, rnd.loss = p.step, p.total_steps, p.loss if p.loss is not None else rnd.loss
            rnd.tokens_per_second, rnd.train_eta = p.tokens_per_second, p.eta_seconds
        elif t == Subject.TRAIN_DONE:
            rnd.train_rows, rnd.train_seconds = p.rows, p.seconds
            rnd.step = rnd.total_steps = max(rnd.total_steps, rnd.step)
            rnd.loss = p.train_loss if p.train_loss is not None else rnd.loss
        elif t == Subject.INFER_DONE:
            rnd.to_judge = p.prompts * p.samples_per_prompt
            if rnd.judge_started is None:
                rnd.judge_started = self.clock()
        elif t == Subject.EVAL_SCORED and p.split != "eval":  # holdout/baseline (at the end): not the round's
            self.usage = self.usage + p.usage
        elif t == Subject.EVAL_SCORED:
            if rnd.judge_started is None:
                rnd.judge_started = self.clock()
            for s in p.scores:
                rnd.scores[f"{s.item_id}#{s.sample}"] = s
            self.usage = self.usage + p.usage
        elif t == Subject.SYNTH_READY:
            self.usage = self.usage + p.usage
        elif t in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED):
            outcome = outcome_of(env)
            self.outcome = f"failed ({p.reason})" if outcome == "failed" else outcome
            self.stage, self.detail = self.outcome, ""
            self.usage = p.usage
        return True

    def judge_eta(self, rnd: _Round) -> float | None:
        """Seconds left to judge the round at the rate seen so far."""
        if not rnd.to_judge or not rnd.judged or rnd.judge_started is None:
            return None
        elapsed = self.clock() - rnd.judge_started
        return max(0.0, (rnd.to_judge - rnd.judged) * elapsed / rnd.judged)

    def _bar(self, done: int, total: int) -> ProgressBar:
        return ProgressBar(total=max(total, 1), completed=min(done, max(total, 1)), width=30)

    def render(self) -> RenderableType:
        """The view as one rich renderable."""
        rounds = f"/{self.max_rounds}" if self.max_rounds else ""
        head = Text.assemble(
            (f"migration {self.migration_id}", "bold"),
            f"  round {self.round}{rounds}  stage ",
            (self.stage + (f" {self.detail}" if self.detail else ""), "cyan"),
            f"  elapsed {format_duration(self.clock() - self.started)}",
        )
        grid = Table.grid(padding=(0, 1))
        grid.add_column(justify="right", style="dim")
        grid.add_column()
        grid.add_column()
        rnd = self.rounds.get(self.round)
        if rnd is not None and rnd.total_steps:
            tps = f" · {rnd.tokens_per_second:,.0f} tok/s" if rnd.tokens_per_second else ""
            loss = f" · loss {rnd.loss:.3f}" if rnd.loss is not None else ""
            eta = "done" if rnd.train_seconds is not None else f"ETA {format_duration(rnd.train_eta)}"
            grid.add_row("training", self._bar(rnd.step, rnd.total_steps),
                         f"step {rnd.step}/{rnd.total_steps}{loss}{tps} · {eta}")
        if rnd is not None and rnd.to_judge:
            score = rnd.mean(self.gate.removesuffix("_mean")) if self.gate.endswith("_mean") else None
            running = f" · {self.gate} so far {score:.1f}" if score is not None else ""
            grid.add_row("judging", self._bar(rnd.judged, rnd.to_judge),
                         f"judged {rnd.judged}/{rnd.to_judge}{running} · ETA {format_duration(self.judge_eta(rnd))}")
        simulated = " (simulated teacher)" if self.usage.simulated else ""
        grid.add_row("service LLM", "", f"{self.usage.calls} calls · {self.usage.tokens:,} tokens · "
                     f"cost ${self.usage.cost:.4f}{simulated}")
        history = [self._round_line(r) for n, r in sorted(self.rounds.items()) if n < self.round or self.outcome]
        for line in history:
            grid.add_row("", "", line)
        return Group(head, grid)

    def _round_line(self, rnd: _Round) -> str:
        metric = self.gate.removesuffix("_mean")
        score = rnd.mean(metric) if self.gate.endswith("_mean") else None
        value = f"{self.gate} {score:.1f}" if score is not None else "not judged"
        gate = f" (gate {self.threshold:g})" if self.threshold is not None else ""
        rows = f"{rnd.train_rows} rows, " if rnd.train_rows is not None else ""
        return f"round {rnd.number}: {rows}{value} on {rnd.judged} answers{gate}"


class LiveProgress:
    """Draw a :class:`MigrationView` live on a terminal, and the milestones as lines above it.

    Use as a context manager; :meth:`update` takes each event. ``console`` decides where it is drawn.
    """

    MILESTONES = frozenset({Subject.TRAIN_DONE, Subject.INFER_DONE, Subject.SYNTH_READY,
                            Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED})

    def __init__(self, view: MigrationView, console: Console, refresh_per_second: float = 4) -> None:
        self.view = view
        self.console = console
        self._live = Live(get_renderable=view.render, console=console, refresh_per_second=refresh_per_second,
                          transient=False)

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)

    def update(self, env: Envelope) -> None:
        """Take one event; milestones are also printed as a line that stays."""
        if self.view.apply(env) and env.type in self.MILESTONES:
            self.console.print(f"[round {env.round}] {describe(env)}", highlight=False, markup=False)
        self._live.refresh()
