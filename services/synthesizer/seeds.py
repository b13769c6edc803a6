"""Seeds for synthesis: train examples drawn without replacement; for the targeted strategy, each failed test
item's nearest train examples first, dealt in turn so that every failure gets its own."""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterable
from itertools import pairwise

from llamaduo.contracts.events import Score
from llamaduo.contracts.spec import JudgeSpec
from llamaduo.data.examples import Example
from llamaduo.data.text import tokenize


def _gate_field(judge: JudgeSpec) -> str:
    return "precision" if judge.gate.startswith("precision") else "similarity"


def falls_short(score: Score, judge: JudgeSpec) -> bool:
    """Whether an answer holds its round below the gate, so the targeted strategy aims at it: its judgement
    failed, or its score on the gated field is under the bar one answer must clear (the threshold for a mean
    gate, e.g. similarity < 90 for ``similarity_mean >= 90``; the cut for a coverage, e.g. < 70 for
    ``coverage_70``). An answer at 83 (one field of six wrong) counts: it is what keeps a mean of 90 away."""
    bar = float(judge.gate.rsplit("_", 1)[1]) if "coverage" in judge.gate else judge.threshold
    value = getattr(score, _gate_field(judge))
    return score.failed or value is None or value < bar


def shortfalls_worst_first(scores: Iterable[Score], judge: JudgeSpec) -> list[str]:
    """Ids of the items whose answers :func:`falls_short`, worst first: failed judgements, then by score on the
    gated field (an item judged more than once counts by its worst), ties by id."""
    worst: dict[str, float] = {}
    for score in scores:
        if falls_short(score, judge):
            value = getattr(score, _gate_field(judge))
            rank = -1.0 if score.failed or value is None else float(value)
            worst[score.item_id] = min(rank, worst.get(score.item_id, rank))
    return sorted(worst, key=lambda item: (worst[item], item))


_LETTERS_RE = re.compile(r"[^\W\d_]+")


def _letters_shape(run: str) -> str:
    if len(run) > 1 and run.isupper():
        return "AA"
    return "A" if run[0].isupper() else "a"


def _shape(token: str) -> str:
    """How a token is written, not what it says: a run of digits ``9``, a run of letters ``a`` (lower case),
    ``A`` (capitalised) or ``AA`` (all capitals), other characters kept ("21.06.2024" -> "9.9.9",
    "€8.504,34" -> "€9.9,9" but "€8,504.34" -> "€9,9.9", "EUR" -> "AA")."""
    return _LETTERS_RE.sub(lambda m: _letters_shape(m.group(0)), re.sub(r"\d+", "9", token))


class Features:
    """What a text says (its word tokens and symbols such as currency signs) and how it is written (pairs of
    neighbouring token shapes)."""

    __slots__ = ("shapes", "words")

    def __init__(self, text: str) -> None:
        self.words = set(tokenize(text)) | {c for c in text if unicodedata.category(c).startswith("S")}
        self.shapes = {f"{a} {b}" for a, b in pairwise(_shape(t) for t in text.split())}

    def closeness(self, other: Features) -> float:
        """Mean of the word and the shape Jaccard similarities, in 0..1."""
        return (_jaccard(self.words, other.words) + _jaccard(self.shapes, other.shapes)) / 2


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class SeedPool:
    """Train examples to draw seeds from, without replacement, in a seeded order.

    ``targets`` (instructions of failed test items, worst first) orders the pool for the targeted strategy:
    each target's nearest train example (by :meth:`Features.closeness`: the same words and the same formats),
    then each target's next nearest, and so on, so that the first seeds cover every failure instead of
    crowding round the commonest one. When the pool runs dry it starts over with the whole train split and
    says so in ``restarted``.
    """

    def __init__(
        self, train: list[Example], exclude: set[str], rng: random.Random, targets: list[str] | None = None
    ) -> None:
        self._train = list(train)
        self._rng = rng
        self._targets = [Features(t) for t in targets or []]
        self._features = {e.id: Features(e.instruction) for e in self._train} if self._targets else {}
        self.restarted = False
        self._queue = self._order([e for e in self._train if e.id not in exclude])

    def _order(self, examples: list[Example]) -> list[Example]:
        order = list(examples)
        self._rng.shuffle(order)
        if not self._targets or not order:
            return order
        rankings = [  # stable sorts: ties keep the shuffled order
            sorted(order, key=lambda e, t=target: -t.closeness(self._features[e.id])) for target in self._targets
        ]
        dealt: list[Example] = []
        taken: set[str] = set()
        position = [0] * len(rankings)
        while True:  # until a pass deals nothing (not a count of rows: an id given twice is dealt once)
            before = len(dealt)
            for i, ranking in enumerate(rankings):
                while position[i] < len(ranking) and ranking[position[i]].id in taken:
                    position[i] += 1
                if position[i] < len(ranking):
                    taken.add(ranking[position[i]].id)
                    dealt.append(ranking[position[i]])
            if len(dealt) == before:
                return dealt

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
