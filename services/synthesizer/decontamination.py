"""Decontamination against the held-out split: n-gram overlap measured on what varies, and identical answers.

A synthetic row is *contaminated* when its instruction or its response overlaps a held-out item's
instruction or response (:class:`HeldOutIndex`):

* **Overlap on what varies.** Most tasks wrap a varying message in a fixed prompt; that prompt overlaps
  every held-out item and says nothing about contamination. :func:`common_ngrams` finds the word n-grams
  present in more than ``share`` of the reference rows (train + held-out; computed for instructions and for
  responses, and only with at least :data:`COMMON_MIN_ROWS` rows), and :func:`varying_runs` masks every
  token such an n-gram covers. Overlap (:class:`Decontaminator`) is the share of a text's n-grams *of its
  varying runs* found in the held-out texts' varying runs: the fixed prompt counts neither in the
  numerator nor in the denominator, and neither do n-grams that straddle prompt and message. Without
  common n-grams (the invoice demo has none) this is the plain n-gram overlap of the whole text.
* **Identical answers.** Responses compare in canonical form (:func:`canonical_answer`): JSON objects and
  arrays parsed and dumped with sorted keys, strings trimmed and case-folded, numbers (and numeric
  strings) rounded to 2 decimals, as :func:`llamaduo.data.scoring.values_match` compares them; other
  texts normalised (:func:`llamaduo.data.text.normalise_text`). An identical answer is evidence only when
  the held-out answer is *distinctive* (:class:`AnswerIndex`): it is the answer of exactly one reference
  row (an answer that recurs, such as a triage label or an answer a train row shares, is part of the
  task's answer vocabulary: a new row may well produce it) and it carries at least ``min_tokens`` word
  tokens of content (JSON: tokens of its leaf values, keys excluded; a one-off short answer such as a
  number can come up by chance).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from llamaduo.data.examples import Example
from llamaduo.data.scoring import as_number
from llamaduo.data.text import extract_json, normalise_text, tokenize

#: Below this many reference rows no n-gram is treated as the task's fixed text (a share means little).
COMMON_MIN_ROWS = 10

Gram = tuple[str, ...]


def _grams(words: Sequence[str], size: int) -> list[Gram]:
    return [tuple(words[i : i + size]) for i in range(len(words) - size + 1)]


def common_ngrams(texts: Iterable[str], n: int, share: float) -> frozenset[Gram]:
    """Word n-grams present in more than ``share`` of ``texts`` (none with fewer than :data:`COMMON_MIN_ROWS`)."""
    rows = [tokenize(t) for t in texts]
    if len(rows) < COMMON_MIN_ROWS:
        return frozenset()
    frequency: Counter[Gram] = Counter()
    for words in rows:
        frequency.update(set(_grams(words, n)))
    limit = share * len(rows)
    return frozenset(g for g, count in frequency.items() if count > limit)


def varying_runs(words: list[str], common: frozenset[Gram], n: int) -> list[list[str]]:
    """The maximal runs of ``words`` that no common n-gram covers (the whole text when nothing is common)."""
    if not words:
        return []
    if not common or len(words) < n:
        return [words]
    fixed = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in common:
            fixed[i : i + n] = [True] * n
    runs: list[list[str]] = []
    current: list[str] = []
    for word, is_fixed in zip(words, fixed, strict=True):
        if is_fixed:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(word)
    if current:
        runs.append(current)
    return runs


def _contains(words: list[str], part: Gram) -> bool:
    k = len(part)
    return any(tuple(words[i : i + k]) == part for i in range(len(words) - k + 1))


class Decontaminator:
    """Word n-gram overlap with held-out texts, measured on what varies.

    :meth:`overlap` is the share of a text's n-grams (of its varying runs, see :func:`varying_runs`; the
    whole text when ``common`` is empty) that occur in a varying run of some held-out text, or, when larger,
    the share of one held-out text's varying n-grams that occur in the text (a held-out item wrapped in new
    words: its message under another prompt is contaminated however long that prompt is). With
    ``short_texts`` (the default), a run with fewer than ``n`` words uses its whole token sequence as its
    only n-gram (found when some held-out run contains it), and a held-out run with fewer than ``n`` words
    that occurs whole in the text counts with the share of the text's varying words it covers. Without,
    such short runs are skipped on both sides (used for responses, where short answers are judged by
    :class:`AnswerIndex` alone).
    """

    def __init__(
        self,
        held_out_texts: list[str],
        n: int,
        threshold: float,
        common: frozenset[Gram] = frozenset(),
        *,
        short_texts: bool = True,
    ) -> None:
        self.n = n
        self.threshold = threshold
        self.common = common
        self.short_texts = short_texts
        self._runs = [r for t in held_out_texts for r in varying_runs(tokenize(t), common, n)]
        self._short = [tuple(r) for r in self._runs if len(r) < n] if short_texts else []
        self._known: dict[int, set[Gram]] = {}
        self._item_sizes: list[int] = []
        self._items_of: dict[Gram, list[int]] = {}
        for text in held_out_texts:
            grams = {g for r in varying_runs(tokenize(text), common, n) if len(r) >= n for g in _grams(r, n)}
            for gram in grams:
                self._items_of.setdefault(gram, []).append(len(self._item_sizes))
            self._item_sizes.append(len(grams))

    def _held_out_grams(self, size: int) -> set[Gram]:
        if size not in self._known:
            self._known[size] = {g for run in self._runs for g in _grams(run, size)}
        return self._known[size]

    def overlap(self, text: str, *, short_texts: bool | None = None) -> float:
        """Share (0..1) of ``text``'s varying n-grams found in the held-out texts (0 when nothing varies)."""
        short = self.short_texts if short_texts is None else short_texts
        runs = varying_runs(tokenize(text), self.common, self.n)
        matched = total = 0
        for run in runs:
            if len(run) < self.n and not short:
                continue
            grams = _grams(run, min(self.n, len(run)))
            known = self._held_out_grams(len(grams[0]))
            total += len(grams)
            matched += sum(1 for g in grams if g in known)
        share = matched / total if total else 0.0
        share = max(share, self._containment(runs))
        if short and self._short:
            varying = sum(len(r) for r in runs)
            for part in self._short:
                if any(len(part) <= len(r) and _contains(r, part) for r in runs):
                    share = max(share, len(part) / varying)
        return share

    def _containment(self, runs: list[list[str]]) -> float:
        """The largest share of one held-out text's varying n-grams that occur in ``runs``."""
        hits: Counter[int] = Counter()
        for gram in {g for r in runs if len(r) >= self.n for g in _grams(r, self.n)}:
            hits.update(self._items_of.get(gram, ()))
        return max((count / self._item_sizes[i] for i, count in hits.items()), default=0.0)

    def is_contaminated(self, text: str, *, short_texts: bool | None = None) -> bool:
        """True when :meth:`overlap` reaches the threshold."""
        return self.overlap(text, short_texts=short_texts) >= self.threshold


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    number = as_number(value)
    if number is not None:
        return round(number, 2) + 0.0
    if isinstance(value, str):
        return normalise_text(value)
    return value


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _parsed(text: str) -> Any:
    """The JSON object or array ``text`` holds (optionally in a code fence), else ``None``."""
    try:
        value = extract_json(text, search=False)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict | list) else None


def canonical_answer(text: str) -> tuple[str, int]:
    """``(canonical form, content tokens)`` of an answer (see the module docstring)."""
    value = _parsed(text)
    if value is None:
        normal = normalise_text(text)
        return normal, len(tokenize(normal))
    canonical = _canonical(value)
    tokens = sum(
        1 if isinstance(leaf, float) else len(tokenize(leaf)) if isinstance(leaf, str) else 0
        for leaf in _leaves(canonical)
    )
    return json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")), tokens


class AnswerIndex:
    """The held-out answers whose identical copy marks a synthetic row as contaminated.

    A held-out answer is kept (*distinctive*) when its canonical form is the answer of exactly one row of
    ``reference`` (train + held-out) and has at least ``min_tokens`` content tokens.
    """

    def __init__(self, held_out: list[Example], reference: list[Example], min_tokens: int) -> None:
        counts = Counter(canonical_answer(e.response)[0] for e in reference)
        self.distinctive: set[str] = set()
        for e in held_out:
            canonical, tokens = canonical_answer(e.response)
            if counts[canonical] <= 1 and tokens >= min_tokens:
                self.distinctive.add(canonical)

    def matches(self, response: str) -> bool:
        """True when ``response`` is, in canonical form, a distinctive held-out answer."""
        return canonical_answer(response)[0] in self.distinctive


class HeldOutIndex:
    """Every contamination check against the held-out split, built once per synthesis run.

    ``reference`` (train + held-out rows) decides what is the task's fixed text and which answers recur.
    :meth:`check` returns ``"contaminated"`` when the instruction overlaps held-out instructions (short
    texts included, as before), ``"contaminated_response"`` when the response is a distinctive held-out
    answer, the response overlaps held-out responses or instructions, or the instruction overlaps held-out
    responses (those three comparisons skip runs with fewer than ``n`` varying words), else ``None``.
    """

    def __init__(
        self, held_out: list[Example], reference: list[Example], n: int, threshold: float, common_share: float,
        answer_min_tokens: int,
    ) -> None:
        responses = [canonical_answer(e.response)[0] for e in held_out]
        common = common_ngrams((e.instruction for e in reference), n, common_share) | common_ngrams(
            (canonical_answer(e.response)[0] for e in reference), n, common_share
        )
        self.common = common
        self.instructions = Decontaminator([e.instruction for e in held_out], n, threshold, common)
        self.responses = Decontaminator(responses, n, threshold, common, short_texts=False)
        self.answers = AnswerIndex(held_out, reference, answer_min_tokens)

    def instruction_overlaps(self, instruction: str) -> bool:
        """The ``contaminated`` check: the instruction overlaps held-out instructions."""
        return self.instructions.is_contaminated(instruction)

    def response_overlaps(self, instruction: str, response: str) -> bool:
        """The ``contaminated_response`` check: a distinctive held-out answer, or overlap across kinds."""
        answer = canonical_answer(response)[0]
        return (
            answer in self.answers.distinctive
            or self.responses.is_contaminated(answer)
            or self.responses.is_contaminated(instruction)
            or self.instructions.is_contaminated(answer, short_texts=False)
        )

    def check(self, instruction: str, response: str) -> str | None:
        """The contamination reason of a row (``contaminated``, ``contaminated_response``), or ``None``."""
        if self.instruction_overlaps(instruction):
            return "contaminated"
        return "contaminated_response" if self.response_overlaps(instruction, response) else None
