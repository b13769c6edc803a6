"""The gate's aggregates over a round's answers."""

from __future__ import annotations

import pytest

from llamaduo.contracts.events import Score
from llamaduo.services.controller.gate import aggregate


def test_aggregate() -> None:
    scores = [
        Score(item_id="a", similarity=100, precision=90),
        Score(item_id="b", similarity=60, precision=50),
        Score(item_id="c", similarity=20, precision=10),
        Score(item_id="d", failed=True, reason="judge down"),
    ]
    agg = aggregate(scores)
    assert agg["similarity_mean"] == pytest.approx(60)
    assert agg["precision_mean"] == pytest.approx(50)
    assert agg["coverage_50"] == pytest.approx(200 / 3)
    assert agg["coverage_70"] == pytest.approx(100 / 3)
    assert agg["precision_coverage_50"] == pytest.approx(200 / 3)  # precision 90 and 50
    assert agg["precision_coverage_70"] == pytest.approx(100 / 3)  # precision 90 only
    assert agg["judged"] == 3 and agg["failed"] == 1


def test_aggregate_empty() -> None:
    agg = aggregate([Score(item_id="x", failed=True)])
    assert agg["judged"] == 0 and agg["failed"] == 1 and agg["similarity_mean"] == 0
    assert set(aggregate([])) == {
        "similarity_mean",
        "precision_mean",
        "coverage_50",
        "coverage_70",
        "precision_coverage_50",
        "precision_coverage_70",
        "judged",
        "failed",
    }
