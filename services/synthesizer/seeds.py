"""Seeds for synthesis: train examples drawn without replacement, most similar to failed test items first
for the targeted strategy."""

from __future__ import annotations

import random

from llamaduo.contracts.events import Score
from llamaduo.contracts.spec import JudgeSpec
from llamaduo.data.examples import Example
from llamaduo.data.text import tokenize


def falls_short(score: Score, judge: JudgeSpec) -> bool:
    """Whether an answer holds its round below the gate, so the targeted strategy aims at it: its judgement
    failed, or its score on the gated field is under the bar one answer must clear (the threshold for a mean
    gate, e.g. similarity < 90 for ``similarity_mean >= 90``; the cut for a coverage, e.g. < 70 for
    ``coverage_70``). An answer at 83 (one field of six wrong) counts: it is what keeps a mean of 90 away."""
    field = "precision" if judge.gate.startswith("precision") else "similarity"
    bar = float(judge.gate.rsplit("_", 1)[1]) if "coverage" in judge.gate else judge.threshold
    value = getattr(score, field)
    return score.failed or value is None or value < bar


def _word_set(text: str) -> set[str]:
    return set(tokenize(text))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class SeedPool:
    """Train examples to draw seeds from, without replacement, in a seeded order.

    ``targets`` (instructions of failed test items) puts the train items most similar to them first
    (word-overlap Jaccard), for the targeted strategy. When the pool runs dry it starts over with the
    whole train split and says so in ``restarted``.
    """

    def __init__(
        self, train: list[Example], exclude: set[str], rng: random.Random, targets: list[str] | None = None
    ) -> None:
        self._train = list(train)
        self._rng = rng
        self._targets = [_word_set(t) for t in targets or []]
        self.restarted = False
        self._queue = self._order([e for e in self._train if e.id not in exclude])

    def _order(self, examples: list[Example]) -> list[Example]:
        order = list(examples)
        self._rng.shuffle(order)
        if self._targets:
            closeness = {
                e.id: max(_jaccard(_word_set(e.instruction), t) for t in self._targets) for e in order
            }
            order.sort(key=lambda e: -closeness[e.id])  # stable: ties keep the shuffled order
        return order

    def draw(self, k: int) -> list[Example]:
        """Up to ``k`` seeds, all different (fewer only if the train split is smaller than ``k``)."""
        seeds: list[Example] = []
        while len(seeds) < k and self._train:
            if not self._queue:
                self.restarted = True
                taken = {s.id for s in seeds}
                self._queue = self._order([e for e in self._train if e.id not in taken])
                if not self._queue:
                    break
            seeds.append(self._queue.pop(0))
        return seeds

