"""Sequential early stopping of judging: decide a round's gate before every answer is judged.

Judged batches arrive one by one, in any order. A batch counts only once every batch before it in the
*published* order (the seeded shuffle of the inference service) is in: the looks are taken on the in-order
prefix, so batches that arrive early (cached answers, a fast worker) cannot bias the sample. After the prefix
grows, the controller asks :func:`sequential_decision` whether the
gated aggregate *of the whole round* (the value judging every answer would give) already lies above or
below the threshold with the requested confidence; if so, it closes the round and the other batches are
never judged.

The interval (pure functions, no I/O) is the intersection of two bounds on the final aggregate
``mu`` over the ``N`` answers of the round, from the ``n`` judged so far, each value in ``[lo, hi]``:

* **Hoeffding-Serfling** (sampling without replacement from a finite population, Serfling 1974; see
  Bardenet & Maillard 2015, Cor. 2.5): ``P(|mean_n - mu| >= t) <= 2 exp(-2 n t^2 / (rho_n (hi-lo)^2))``
  with ``rho_n = 1 - (n-1)/N``. It holds when the judged answers are a uniformly random subset of the
  round's answers, i.e. when the test split is in random order (the arrival order of batches does not
  depend on the scores). Valid for *sequential peeking* by a **union bound over looks**: a round of
  ``B`` batches is looked at no more than ``B`` times, so each look uses ``delta = (1 - confidence) / B``
  (Bonferroni); the probability that any look's interval misses ``mu`` is at most ``1 - confidence``.
* **Deterministic bounds**: the ``N - n`` answers not judged yet score somewhere in ``[lo, hi]``, so
  ``mu`` lies in ``[(S + (N-n) lo) / N, (S + (N-n) hi) / N]`` for sure (``S`` the sum so far), whatever the
  order of the answers. This alone already decides a clearly failing round after a few batches.

Both contain ``mu`` (the first with the stated probability), so their intersection does too. One bound
serves every gate: means of 1..100 scores (``similarity_mean``, ``precision_mean``; range ``[1, 100]``)
and coverage shares (``coverage_*``, ``precision_coverage_*``: each answer contributes 100 or 0; range
``[0, 100]``). Only sums and counts are needed (:class:`~llamaduo.contracts.state.GateStats`).
Failed judgements are left out of the aggregate, so they leave the population too (``N`` shrinks); both
bounds stay conservative when later answers fail as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llamaduo.contracts.state import GateStats
from llamaduo.services.controller.gate import gate_range, gate_total

Verdict = Literal["above", "below"]

@dataclass(frozen=True)
class GateInterval:
    """Where the final aggregate over the whole round lies (with probability ``confidence``)."""

    mean: float
    low: float
    high: float
    n: int
    population: int
    confidence: float
    looks: int

    def verdict(self, threshold: float) -> Verdict | None:
        """``above`` when the interval lies at or above ``threshold`` (the gate passes), ``below`` when it
        lies entirely below it, else None."""
        if self.low >= threshold:
            return "above"
        if self.high < threshold:
            return "below"
        return None


def hoeffding_serfling_halfwidth(n: int, population: int, value_range: float, delta: float) -> float:
    """Two-sided half-width at level ``1 - delta`` for the mean of ``n`` draws without replacement from a
    population of ``population`` values spanning ``value_range``."""
    if n <= 0:
        return math.inf
    rho = max(0.0, 1.0 - (n - 1) / max(population, n))
    return value_range * math.sqrt(math.log(2.0 / delta) * rho / (2.0 * n))


def confidence_interval(
    values: Sequence[float],
    population: int,
    lo: float,
    hi: float,
    *,
    confidence: float = 0.95,
    looks: int = 1,
) -> GateInterval:
    """Interval for the mean over all ``population`` values from the first ``len(values)`` (see the module
    docstring): Hoeffding-Serfling at ``delta = (1 - confidence) / looks`` intersected with the
    deterministic bounds. ``population`` is raised to ``len(values)`` if smaller."""
    return interval_from_sum(float(sum(values)), len(values), population, lo, hi, confidence=confidence,
                             looks=looks)


def interval_from_sum(
    total: float,
    n: int,
    population: int,
    lo: float,
    hi: float,
    *,
    confidence: float = 0.95,
    looks: int = 1,
) -> GateInterval:
    """:func:`confidence_interval` from the sum ``total`` of ``n`` values (all it needs)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    population = max(population, n)
    looks = max(1, looks)
    if n == 0:
        return GateInterval((lo + hi) / 2, lo, hi, 0, population, confidence, looks)
    mean = total / n
    rest = population - n
    det_low, det_high = (total + rest * lo) / population, (total + rest * hi) / population
    width = hoeffding_serfling_halfwidth(n, population, hi - lo, (1.0 - confidence) / looks)
    low = max(det_low, mean - width, lo)
    high = min(det_high, mean + width, hi)
    return GateInterval(mean, low, high, n, population, confidence, looks)


def sequential_decision(
    stats: GateStats,
    gate: str,
    threshold: float,
    *,
    to_judge: int,
    looks: int,
    confidence: float = 0.95,
    min_judged: int = 10,
) -> tuple[Verdict | None, GateInterval]:
    """Early verdict on ``gate >= threshold`` from the statistics of the answers judged so far (constant time).

    ``to_judge`` is the number of answers in the round (an upper bound is fine); ``looks`` the most times
    this is asked for the round (its number of batches). No verdict before ``min_judged`` answers were
    judged successfully (failed judgements leave the population).
    """
    lo, hi = gate_range(gate)
    interval = interval_from_sum(gate_total(stats, gate), stats.judged, to_judge - stats.failed, lo, hi,
                                 confidence=confidence, looks=looks)
    if stats.judged < min_judged:
        return None, interval
    return interval.verdict(threshold), interval
