"""The CLI's per-round table shows the chosen round's holdout score beside the gate score."""

from __future__ import annotations

import io

from llamaduo.cli.migrate import holdout_line, print_table, summary
from llamaduo.contracts.events import (
    ArtifactRef,
    MigrationCompleted,
    RoundSummary,
    Subject,
    start_envelope,
)


def _final(holdout: dict[str, float], note: str = "") -> object:
    rounds = [
        RoundSummary(round=0, aggregates={"similarity_mean": 40.0}, gate_metric="similarity_mean", threshold=90,
                     decision="continue"),
        RoundSummary(round=1, aggregates={"similarity_mean": 94.1}, gate_metric="similarity_mean", threshold=90,
                     decision="pass", holdout_aggregates=holdout, holdout_judged=20 if holdout else 0,
                     holdout_to_judge=20, holdout_note=note),
    ]
    start = start_envelope("m-table", {})
    return start.follow(Subject.MIGRATION_COMPLETED, MigrationCompleted(
        model=ArtifactRef(key="a1"), best_round=1, rounds=rounds), key="completed")


def test_table_has_a_holdout_line_for_the_chosen_round() -> None:
    s = summary("m-table", _final({"similarity_mean": 88.04, "judged": 20.0}))  # type: ignore[arg-type]
    out = io.StringIO()
    print_table(s, out)
    text = out.getvalue()
    assert "holdout, round 1 (chosen" in text and "similarity_mean 88.0 on 20/20 answers" in text
    assert "beside the gate's 94.1" in text
    assert s["rounds"][1]["holdout"]["similarity_mean"] == 88.04 and s["rounds"][0]["holdout"] == {}


def test_no_holdout_line_without_a_holdout_and_a_note_when_it_was_not_judged() -> None:
    assert holdout_line(summary("m-table", _final({}))) == ""  # type: ignore[arg-type]
    line = holdout_line(summary("m-table", _final({}, note="holdout not judged: the budget is spent")))  # type: ignore[arg-type]
    assert "no score on 0/20 answers" in line and "the budget is spent" in line
