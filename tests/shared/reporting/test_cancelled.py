"""A cancelled migration as people see it: the CLI summary and table, the event line, the live view."""

from __future__ import annotations

import io

from llamaduo.cli.migrate import print_table, summary
from llamaduo.contracts.events import (
    ArtifactRef,
    MigrationFailed,
    RoundSummary,
    Subject,
    start_envelope,
)
from llamaduo.reporting.progress import MigrationView, describe


def cancelled(reason: str = "cancelled"):
    return start_envelope("m-view", {}).follow(Subject.MIGRATION_FAILED, MigrationFailed(
        reason=reason, detail="cancelled by ada@host: wrong teacher", best_model=ArtifactRef(key="m/round-0/adapter"),
        best_round=0, rounds=[RoundSummary(round=0, gate_metric="similarity_mean", threshold=90,
                                           aggregates={"similarity_mean": 60.0}, decision="continue")]))


def test_summary_and_table_say_cancelled_and_name_the_kept_model():
    out = summary("m-view", cancelled())
    assert out["status"] == "cancelled" and out["model"] == "m/round-0/adapter" and out["best_round"] == 0
    text = io.StringIO()
    print_table(out, text)
    shown = text.getvalue()
    assert "migration m-view: cancelled" in shown
    assert "model: m/round-0/adapter (best round 0, kept)" in shown
    assert "cancelled: cancelled by ada@host: wrong teacher" in shown
    assert summary("m-view", cancelled(reason="max_rounds"))["status"] == "failed"


def test_event_line_and_live_view_say_cancelled():
    env = cancelled()
    assert describe(env) == "cancelled by ada@host: wrong teacher; best round 0 kept: m/round-0/adapter"
    view = MigrationView("m-view")
    view.apply(env)
    assert view.outcome == "cancelled"
    other = MigrationView("m-view")
    other.apply(cancelled(reason="plateau"))
    assert other.outcome == "failed (plateau)"
