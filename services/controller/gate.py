"""The gate's aggregates over a round's answers, from their sufficient statistics (:class:`GateStats`).

The controller never keeps a round's scores: each judged batch is reduced to a :class:`GateStats` once
(:meth:`GateStats.from_scores`), batches are summed, and every aggregate below is read off the sums.
"""

from __future__ import annotations

from llamaduo.contracts.events import Score
from llamaduo.contracts.state import GateStats

#: Coverage aggregates: name -> (score field, cut). Each answer contributes 100 (at or above the cut) or 0.
COVERAGES = {
    "coverage_50": ("similarity", 50),
    "coverage_70": ("similarity", 70),
    "precision_coverage_50": ("precision", 50),
    "precision_coverage_70": ("precision", 70),
}


def aggregate_stats(stats: GateStats) -> dict[str, float]:
    """Round aggregates from the statistics of its answers (M judgements already averaged per answer).

    Means and coverages are over the answers that were judged (failed judgements are excluded and
    counted in ``failed``); coverages are percentages of judged answers scoring >= 50 / >= 70, on
    similarity (``coverage_*``) and on precision (``precision_coverage_*``).
    """
    n = stats.judged
    out = {"judged": float(n), "failed": float(stats.failed)}
    if not n:
        return {"similarity_mean": 0.0, "precision_mean": 0.0, **dict.fromkeys(COVERAGES, 0.0), **out}
    return {
        "similarity_mean": stats.similarity_sum / n,
        "precision_mean": stats.precision_sum / n,
        **{name: gate_total(stats, name) / n for name in COVERAGES},
        **out,
    }


def aggregate(scores: list[Score]) -> dict[str, float]:
    """Round aggregates over answers (one :class:`Score` per answer), see :func:`aggregate_stats`."""
    return aggregate_stats(GateStats.from_scores(scores))


def gate_range(gate: str) -> tuple[float, float]:
    """Range of one answer's contribution to aggregate ``gate``."""
    if gate in COVERAGES:
        return 0.0, 100.0
    if gate in ("similarity_mean", "precision_mean"):
        return 1.0, 100.0
    raise ValueError(f"unknown gate aggregate {gate!r}")


def gate_total(stats: GateStats, gate: str) -> float:
    """Sum over the judged answers of each one's contribution to ``gate`` (``gate = total / judged``)."""
    if gate == "similarity_mean":
        return stats.similarity_sum
    if gate == "precision_mean":
        return stats.precision_sum
    if gate in COVERAGES:
        field, cut = COVERAGES[gate]
        return 100.0 * getattr(stats, f"{field}_ge{cut}")
    raise ValueError(f"unknown gate aggregate {gate!r}")
