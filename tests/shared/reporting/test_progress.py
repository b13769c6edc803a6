"""The live progress view: events folded into round, stage, training, judging, tokens, cost and ETA."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    MigrationCompleted,
    MigrationProgress,
    Score,
    Stage,
    Subject,
    TrainDone,
    TrainProgress,
    TrainRequest,
    Usage,
    start_envelope,
)
from llamaduo.reporting.progress import LiveProgress, MigrationView, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def text_of(view: MigrationView) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(view.render())
    return console.file.getvalue()  # type: ignore[attr-defined]


def scored(start, batch: int, sims: list[float], tokens: int, cost: float):  # type: ignore[no-untyped-def]
    scores = [Score(item_id=f"t{batch}-{i}", sample=0, similarity=s, precision=s, reason="")
              for i, s in enumerate(sims)]
    usage = Usage(calls=len(sims), input_tokens=tokens - 10, output_tokens=10, cost=cost)
    return start.follow(Subject.EVAL_SCORED, EvalScored(batch=batch, batches=5, scores=scores, usage=usage,
                                                        provider="openai:gpt"), round=0, key=f"b{batch}")


def test_view_follows_a_round_training_then_judging_with_eta_tokens_and_cost() -> None:
    clock = FakeClock()
    start = start_envelope("m-progress01", {"task": {}})
    view = MigrationView("m-progress01", gate="similarity_mean", threshold=90, max_rounds=4, clock=clock)
    view.apply(start.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[ArtifactRef(key="d")], rows=16),
                            round=0, key="train"))
    view.apply(start.follow(Subject.TRAIN_PROGRESS, TrainProgress(step=3, total_steps=8, loss=1.25,
                                                                  tokens_per_second=812, eta_seconds=95),
                            round=0, key="p3"))
    text = text_of(view)
    assert "round 0/4" in text and "training" in text
    assert "step 3/8" in text and "loss 1.250" in text and "812 tok/s" in text and "ETA 1:35" in text

    view.apply(start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a"), rows=16, train_loss=0.9,
                                                          seconds=40), round=0, key="done"))
    view.apply(start.follow(Subject.INFER_DONE, InferDone(predictions=ArtifactRef(key="p"), prompts=25,
                                                          samples_per_prompt=2, batches=5), round=0, key="inf"))
    view.apply(start.follow(Subject.MIGRATION_PROGRESS, MigrationProgress(stage=Stage.JUDGING, judged=0,
                                                                          to_judge=50), round=0, key="j"))
    clock.now += 20  # 20 s to judge the first 10 answers: 40 answers left -> 80 s
    first = scored(start, 0, [80.0] * 5 + [60.0] * 5, tokens=1000, cost=0.002)
    assert view.apply(first)
    text = text_of(view)
    assert "step 8/8" in text and "done" in text
    assert "judged 10/50" in text and "similarity_mean so far 70.0" in text and "ETA 1:20" in text
    assert "1,000 tokens" in text and "cost $0.0020" in text and "10 calls" in text

    assert not view.apply(first), "a redelivered batch must not count twice"
    assert "judged 10/50" in text_of(view) and "1,000 tokens" in text_of(view)

    clock.now += 20
    view.apply(scored(start, 1, [100.0] * 10, tokens=500, cost=0.001))
    text = text_of(view)
    assert "judged 20/50" in text and "so far 85.0" in text and "ETA 1:00" in text
    assert "1,500 tokens" in text and "cost $0.0030" in text


def test_view_keeps_round_history_and_final_usage() -> None:
    clock = FakeClock()
    start = start_envelope("m-progress02", {"task": {}})
    view = MigrationView("m-progress02", threshold=90, clock=clock)
    view.apply(scored(start, 0, [40.0] * 10, tokens=100, cost=0.0))
    view.apply(start.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[ArtifactRef(key="d")], rows=144),
                            round=1, key="train"))
    text = text_of(view)
    assert "round 1" in text and "round 0: similarity_mean 40.0 on 10 answers (gate 90)" in text
    final = Usage(calls=99, input_tokens=12_000, output_tokens=345, cost=0.5)
    view.apply(start.follow(Subject.MIGRATION_COMPLETED, MigrationCompleted(
        model=ArtifactRef(key="m"), best_round=1, rounds=[], usage=final), round=1, key="completed"))
    text = text_of(view)
    assert "completed" in text and "12,345 tokens" in text and "cost $0.5000" in text
    assert "round 1: 144 rows, not judged" in text


def test_live_progress_draws_on_a_terminal_and_prints_milestones() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    start = start_envelope("m-progress03", {"task": {}})
    view = MigrationView("m-progress03", clock=FakeClock())
    with LiveProgress(view, console) as live:
        live.update(start.follow(Subject.TRAIN_PROGRESS, TrainProgress(step=1, total_steps=4, loss=2.0),
                                 round=0, key="p1"))
        live.update(start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a"), rows=16,
                                                               seconds=3), round=0, key="d"))
    drawn = out.getvalue()
    assert "[round 0] trained on 16 rows in 3s" in drawn
    assert "step 4/4" in drawn and "migration m-progress03" in drawn


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725) == "1:02:05"


@pytest.mark.parametrize("split", ["holdout", "baseline"])
def test_holdout_and_baseline_batches_count_as_usage_but_not_as_the_round_score(split: str) -> None:
    start = start_envelope("m-progress03", {"task": {}})
    view = MigrationView("m-progress03", threshold=90, clock=FakeClock())
    view.apply(scored(start, 0, [95.0] * 10, tokens=100, cost=0.0))
    other = scored(start, 0, [10.0] * 10, tokens=50, cost=0.0)
    other = other.model_copy(update={"event_id": f"{split}-0",
                                     "payload": other.payload.model_copy(update={"split": split})})
    assert view.apply(other)
    assert {s.similarity for s in view.rounds[0].scores.values()} == {95.0} and len(view.rounds[0].scores) == 10
    assert view.usage.tokens == 150


def test_route_events_are_described_by_route_mode_and_reason():
    from llamaduo.contracts.events import route_envelope
    from llamaduo.contracts.gateway import RouteChanged, RouteFallback
    from llamaduo.reporting.progress import describe

    changed = route_envelope(Subject.ROUTE_CHANGED, RouteChanged(route="tickets", mode="canary", percent=25,
                                                                 version="m-1", reason="promote"), "tickets")
    assert describe(changed) == "route tickets: canary 25% version m-1 (promote)"
    fallback = route_envelope(Subject.ROUTE_FALLBACK, RouteFallback(route="tickets", request_id="r-1", version="m-1",
                                                                    reason="timeout"), "tickets")
    assert describe(fallback) == "route tickets: answered upstream (timeout)"
