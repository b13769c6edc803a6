"""The synthesizer's filters: which generated rows are kept, each removal counted by reason.

:class:`RowFilter` applies them in this order:

* ``invalid`` / ``empty``: a row without string ``instruction``/``response``, or with a blank one;
* ``duplicate``: the normalised instruction equals a train instruction, one kept in an earlier round
  (``earlier``), an earlier kept one or one earlier in the same batch;
* ``contaminated``: at least ``spec.decontamination_overlap`` of the instruction's varying word n-grams
  (``n = spec.decontamination_ngram``; the task's fixed prompt does not count; shorter texts use their whole
  token sequence) occur in the held-out split's instructions
  (:class:`~llamaduo.services.synthesizer.decontamination.HeldOutIndex`), or (when
  ``spec.embedding_decontamination_threshold`` is set) the sentence-embedding cosine similarity to some
  held-out instruction is at or above that threshold, which catches paraphrases of held-out items;
* ``contaminated_response``: the response is, in canonical form, a distinctive held-out answer (a
  re-worded held-out item with the same answer), or the response or instruction overlaps held-out responses
  or instructions as above (see :mod:`~llamaduo.services.synthesizer.decontamination` for the rules);
* ``near_duplicate``: MinHash-LSH estimated Jaccard similarity of word shingles to a train, earlier-round
  or kept instruction at or above the threshold (default 0.9, :class:`NearDuplicateIndex`), or (when
  ``spec.embedding_near_duplicate_threshold`` is set) the embedding cosine to such an instruction at or
  above that threshold, which catches reworded copies.

The embedding checks (:class:`EmbeddingFilter`, model in :mod:`llamaduo.data.embeddings`) are off by default
(measured in ``tests/services/synthesizer/test_embeddings.py``): on templated instructions such as the invoice demo,
genuinely new items are as close to the test split (cosine up to about 0.95) as paraphrases of test items
are (0.63 to 0.93), so no threshold separates them; on free-text questions a threshold of 0.5 removes
every planted paraphrase and no off-topic question, but also most new questions on a test item's topic.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH

from llamaduo.contracts.spec import SynthesisSpec
from llamaduo.data.embeddings import SentenceEmbedder, max_cosine
from llamaduo.data.examples import Example
from llamaduo.data.text import normalise_text, tokenize
from llamaduo.services.synthesizer.decontamination import HeldOutIndex

DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.9
SHINGLE_WORDS = 3
NUM_PERM = 128


def text_hash(text: str) -> str:
    """Hash of the normalised text (exact-duplicate key)."""
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


def shingles(text: str, k: int = SHINGLE_WORDS) -> set[str]:
    """Word k-shingles of ``text``; a text shorter than ``k`` words is one shingle."""
    words = tokenize(text)
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def minhash(text: str) -> MinHash:
    """MinHash signature of ``text``'s word shingles."""
    m = MinHash(num_perm=NUM_PERM)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


class NearDuplicateIndex:
    """MinHash LSH over instructions; a query is a near-duplicate when the estimated Jaccard similarity
    to an indexed text is at or above ``threshold``."""

    def __init__(self, threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD) -> None:
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._signatures: dict[str, MinHash] = {}

    def add(self, key: str, text: str) -> None:
        """Index ``text`` under ``key`` (a key already present is ignored)."""
        if key in self._signatures:
            return
        signature = minhash(text)
        self._signatures[key] = signature
        self._lsh.insert(key, signature)

    def match(self, text: str) -> str | None:
        """The key of an indexed near-duplicate of ``text``, or ``None``."""
        signature = minhash(text)
        best: tuple[float, str] | None = None
        for key in self._lsh.query(signature):
            similarity = signature.jaccard(self._signatures[key])
            if similarity >= self.threshold and (best is None or similarity > best[0]):
                best = (similarity, key)
        return best[1] if best else None


class EmbeddingFilter:
    """Sentence-embedding cosine similarity to the test split and to train + kept instructions.

    The test and train instructions are encoded once, at construction. A candidate is *contaminated*
    when its highest cosine to a test instruction is at or above ``decontamination_threshold``, and a
    *near-duplicate* when its highest cosine to a train or :meth:`add`-ed instruction is at or above
    ``near_duplicate_threshold``; a ``None`` threshold turns that check off (and skips encoding what
    only it needs). Candidates are encoded in batches with :meth:`encode`.
    """

    def __init__(
        self,
        embedder: SentenceEmbedder,
        train_instructions: list[str],
        test_instructions: list[str],
        decontamination_threshold: float | None,
        near_duplicate_threshold: float | None,
    ) -> None:
        self.embedder = embedder
        self.decontamination_threshold = decontamination_threshold
        self.near_duplicate_threshold = near_duplicate_threshold
        check_test = decontamination_threshold is not None and bool(test_instructions)
        check_near = near_duplicate_threshold is not None
        self._test = embedder.encode(test_instructions) if check_test else None
        self._known: list[np.ndarray] = []
        if check_near and train_instructions:
            self._known.append(embedder.encode(train_instructions))

    @property
    def active(self) -> bool:
        """Whether any check is on."""
        return self.decontamination_threshold is not None or self.near_duplicate_threshold is not None

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings of ``texts``, one batched pass."""
        return self.embedder.encode(texts)

    def test_similarity(self, vectors: np.ndarray) -> np.ndarray:
        """Each vector's highest cosine to a test instruction (``-1`` with no test split)."""
        if self._test is None:
            return np.full(len(vectors), -1.0, dtype=np.float32)
        return max_cosine(vectors, self._test)

    def known_similarity(self, vectors: np.ndarray) -> np.ndarray:
        """Each vector's highest cosine to a train or added instruction (``-1`` when there is none)."""
        if not self._known:
            return np.full(len(vectors), -1.0, dtype=np.float32)
        if len(self._known) > 1:
            self._known = [np.concatenate(self._known, axis=0)]
        return max_cosine(vectors, self._known[0])

    def is_contaminated(self, vector: np.ndarray) -> bool:
        """True when the decontamination check is on and ``vector`` reaches its threshold."""
        threshold = self.decontamination_threshold
        return threshold is not None and float(self.test_similarity(vector[None, :])[0]) >= threshold

    def is_near_duplicate(self, vector: np.ndarray) -> bool:
        """True when the near-duplicate check is on and ``vector`` reaches its threshold."""
        threshold = self.near_duplicate_threshold
        return threshold is not None and float(self.known_similarity(vector[None, :])[0]) >= threshold

    def add(self, vector: np.ndarray) -> None:
        """Remember a kept instruction's embedding for later near-duplicate checks."""
        if self.near_duplicate_threshold is not None:
            self._known.append(vector[None, :])


class RowFilter:
    """Applies the filters in order and remembers what was kept.

    ``train`` and ``earlier`` (synthetic rows kept by earlier rounds) are what a row must not duplicate;
    ``held_out`` (the split that judges the model) is what it must not be contaminated by.
    """

    def __init__(
        self,
        train: list[Example],
        held_out: list[Example],
        spec: SynthesisSpec,
        threshold: float,
        embeddings: EmbeddingFilter | None = None,
        earlier: Sequence[Example] = (),
    ) -> None:
        known = [*train, *earlier]
        self.seen = {text_hash(e.instruction) for e in known}
        self.near = NearDuplicateIndex(threshold)
        for e in train:
            self.near.add(f"train:{e.id}", e.instruction)
        for e in earlier:
            self.near.add(f"earlier:{e.id}", e.instruction)
        self.held_out = HeldOutIndex(
            held_out, [*train, *held_out], spec.decontamination_ngram, spec.decontamination_overlap,
            spec.decontamination_common_share, spec.decontamination_answer_min_tokens,
        )
        self.embeddings = embeddings if embeddings is not None and embeddings.active else None
        self.removed: Counter[str] = Counter()

    @staticmethod
    def fields(row: Any) -> tuple[str, str] | str:
        """The row's stripped ``(instruction, response)``, or why it is unusable (``invalid``/``empty``)."""
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("response"), str)
        ):
            return "invalid"
        instruction, response = row["instruction"].strip(), row["response"].strip()
        return (instruction, response) if instruction and response else "empty"

    def embed(self, rows: list[Any]) -> dict[str, np.ndarray]:
        """Embeddings of the usable rows' instructions, encoded in one batch (empty when the checks are off)."""
        if self.embeddings is None:
            return {}
        texts = list(dict.fromkeys(f[0] for f in map(self.fields, rows) if isinstance(f, tuple)))
        if not texts:
            return {}
        return dict(zip(texts, self.embeddings.encode(texts), strict=True))

    def check(self, row: Any, vectors: dict[str, np.ndarray] | None = None) -> tuple[str, str] | None:
        """``(instruction, response)`` if the row is kept, else ``None`` (the reason is counted).

        ``vectors`` maps instructions to their embeddings (from :meth:`embed`); with the embedding checks
        on, a missing one is encoded here, alone.
        """
        fields = self.fields(row)
        if isinstance(fields, str):
            self.removed[fields] += 1
            return None
        instruction, _ = fields
        key = text_hash(instruction)
        if key in self.seen:
            self.removed["duplicate"] += 1
            return None
        self.seen.add(key)
        emb, vector = self.embeddings, None
        if emb is not None:
            vector = (vectors or {}).get(instruction)
            if vector is None:
                vector = emb.encode([instruction])[0]
        if self.held_out.instruction_overlaps(instruction) or (
            emb is not None and vector is not None and emb.is_contaminated(vector)
        ):
            self.removed["contaminated"] += 1
            return None
        if self.held_out.response_overlaps(*fields):
            self.removed["contaminated_response"] += 1
            return None
        if self.near.match(instruction) is not None or (
            emb is not None and vector is not None and emb.is_near_duplicate(vector)
        ):
            self.removed["near_duplicate"] += 1
            return None
        self.near.add(f"kept:{key}", instruction)
        if emb is not None and vector is not None:
            emb.add(vector)
        return fields

