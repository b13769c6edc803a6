"""The gate's aggregates over a round's answers, and each answer's contribution to them."""

from __future__ import annotations

from collections.abc import Sequence

from llamaduo.contracts.events import Score


def aggregate(scores: list[Score]) -> dict[str, float]:
    """Round aggregates over answers (one :class:`Score` per answer, M judgements already averaged).

    Means and coverages are over the answers that were judged (failed judgements are excluded and
    counted in ``failed``); coverages are percentages of judged answers with similarity >= 50 / >= 70.
    """
    judged = [s for s in scores if not s.failed and s.similarity is not None and s.precision is not None]
    failed = len(scores) - len(judged)
    if not judged:
        return {
            "similarity_mean": 0.0,
            "precision_mean": 0.0,
            "coverage_50": 0.0,
            "coverage_70": 0.0,
            "judged": 0.0,
            "failed": float(failed),
        }
    n = len(judged)
    similarities = [float(s.similarity) for s in judged if s.similarity is not None]
    precisions = [float(s.precision) for s in judged if s.precision is not None]
    return {
        "similarity_mean": sum(similarities) / n,
        "precision_mean": sum(precisions) / n,
        "coverage_50": 100.0 * sum(1 for v in similarities if v >= 50) / n,
        "coverage_70": 100.0 * sum(1 for v in similarities if v >= 70) / n,
        "judged": float(n),
        "failed": float(failed),
    }


def gate_range(gate: str) -> tuple[float, float]:
    """Range of one answer's contribution to aggregate ``gate``."""
    if gate.startswith("coverage_"):
        return 0.0, 100.0
    if gate in ("similarity_mean", "precision_mean"):
        return 1.0, 100.0
    raise ValueError(f"unknown gate aggregate {gate!r}")


def gate_values(scores: Sequence[Score], gate: str) -> list[float]:
    """One value per judged answer whose mean is aggregate ``gate`` (as in :func:`aggregate`)."""
    judged = [s for s in scores if not s.failed and s.similarity is not None and s.precision is not None]
    if gate == "similarity_mean":
        return [float(s.similarity) for s in judged]  # type: ignore[arg-type]
    if gate == "precision_mean":
        return [float(s.precision) for s in judged]  # type: ignore[arg-type]
    if gate.startswith("coverage_"):
        cut = float(gate.removeprefix("coverage_"))
        return [100.0 if float(s.similarity) >= cut else 0.0 for s in judged]  # type: ignore[arg-type]
    raise ValueError(f"unknown gate aggregate {gate!r}")
