"""The synthesizer: the service LLM writes new training examples from train-split seeds, then filters.

Plain async code, no messaging: :func:`synthesize` draws seeds from the TRAIN split only (never reusing
seeds of earlier rounds until the pool runs out), asks the provider for new examples like them, validates
the replies (bad replies are re-asked a bounded number of times; a call that still fails is counted, never
raised) and keeps only examples that pass the filters, each removal counted by reason:

* ``invalid`` / ``empty``: a row without string ``instruction``/``response``, or with a blank one;
* ``duplicate``: the normalised instruction equals a train instruction, an earlier kept one or one earlier
  in the same batch;
* ``contaminated``: at least ``spec.decontamination_overlap`` of the instruction's word n-grams
  (``n = spec.decontamination_ngram``; shorter texts use their whole token sequence) occur in the test set,
  or (when ``spec.embedding_decontamination_threshold`` is set) the sentence-embedding cosine similarity
  to some test instruction is at or above that threshold, which catches paraphrases of test items;
* ``near_duplicate``: MinHash-LSH estimated Jaccard similarity of word shingles to a train or kept
  instruction at or above the threshold (default 0.9), or (when
  ``spec.embedding_near_duplicate_threshold`` is set) the embedding cosine to a train or kept instruction
  at or above that threshold, which catches reworded copies;
* ``excess``: rows beyond what a call asked for.

The embedding checks (:class:`EmbeddingFilter`, model in :mod:`llamaduo.data.embeddings`) are off by default
(measured in ``tests/services/synthesizer/test_embeddings.py``): on templated instructions such as the invoice demo,
genuinely new items are as close to the test split (cosine up to about 0.95) as paraphrases of test items
are (0.63 to 0.93), so no threshold separates them; on free-text questions a threshold of 0.5 removes
every planted paraphrase and no off-topic question, but also most new questions on a test item's topic.
Embeddings are computed in batches: train and test instructions once per :func:`synthesize` run, each
call's candidate rows at once, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections import Counter
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, Field

from llamaduo.contracts.events import SynthRequest, Usage
from llamaduo.contracts.spec import SynthesisSpec
from llamaduo.data.embeddings import SentenceEmbedder, get_embedder, max_cosine
from llamaduo.data.examples import Example, example_id
from llamaduo.data.text import normalise_text, strip_code_fence, tokenize
from llamaduo.providers.base import ChatMessage, CompletionRequest, Provider, ProviderError

DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.9
SHINGLE_WORDS = 3
NUM_PERM = 128

#: Structured-output schema of one synthesis reply.
SYNTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"instruction": {"type": "string"}, "response": {"type": "string"}},
                "required": ["instruction", "response"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["examples"],
    "additionalProperties": False,
}

_SYSTEM = (
    "You create high-quality training data for a small language model that must learn one task. "
    "You reply with a single JSON object and nothing else."
)
_REASK = (
    'Your previous reply could not be used: {error}. Reply again with only the JSON object {{"examples": '
    '[{{"instruction": "...", "response": "..."}}]}} holding {n} new examples.'
)


class SynthResult(BaseModel):
    """What one synthesis round produced."""

    examples: list[Example] = Field(
        default_factory=list, description="Kept examples, source 'synthetic:<round>'"
    )
    generated: int = Field(default=0, description="Rows the provider returned")
    kept: int = 0
    removed: dict[str, int] = Field(default_factory=dict, description="Removed rows by reason")
    seed_ids: list[str] = Field(default_factory=list, description="Train ids used as seeds, in order of use")
    usage: Usage = Field(default_factory=Usage)
    calls: int = Field(default=0, description="Synthesis calls (each may have several attempts)")
    failed_calls: int = Field(default=0, description="Calls that gave no usable reply after their attempts")
    seed_pool_restarted: bool = False
    notes: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------ prompt


def build_messages(seeds: list[Example], n: int, system_prompt: str) -> list[ChatMessage]:
    """The generation prompt: the task's system prompt, the seed examples and the output format."""
    shown = json.dumps(
        [{"instruction": s.instruction, "response": s.response} for s in seeds], ensure_ascii=False, indent=1
    )
    task = (
        f"The assistant being trained uses this system prompt:\n{system_prompt}\n\n" if system_prompt else ""
    )
    user = (
        f"{task}Here are examples of the task (instruction and the correct response):\n{shown}\n\n"
        f"Write {n} NEW examples of the same task: same kind of instruction, same style and response format, "
        "but different content from the examples above and from each other. Each response must be the "
        "correct answer to its instruction, in exactly the format the examples use.\n\n"
        'Reply with only this JSON object: {"examples": [{"instruction": "...", "response": "..."}]}'
    )
    return [ChatMessage(role="system", content=_SYSTEM), ChatMessage(role="user", content=user)]


def parse_reply(text: str) -> list[Any]:
    """The ``examples`` list of a reply; raise ``ValueError`` if the reply has none."""
    body = strip_code_fence(text)
    try:
        data = json.loads(body)
    except ValueError:
        start, end = body.find("{"), body.rfind("}")
        if start == -1 or end <= start:
            raise ValueError(f"not JSON: {text[:80]!r}") from None
        try:
            data = json.loads(body[start : end + 1])
        except ValueError:
            raise ValueError(f"not JSON: {text[:80]!r}") from None
    if isinstance(data, list):
        data = {"examples": data}
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError('no "examples" list in the reply')
    return data["examples"]


# ------------------------------------------------------------------------------------------ filters


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


class Decontaminator:
    """Word n-gram overlap with the test split.

    :meth:`overlap` is the share of a text's n-grams that occur in any test instruction. A text with
    fewer than ``n`` words uses its whole token sequence as its only n-gram (found when some test
    instruction contains it). A test instruction with fewer than ``n`` words that occurs whole in the
    text counts with the share of the text it covers.
    """

    def __init__(self, test_instructions: list[str], n: int, threshold: float) -> None:
        self.n = n
        self.threshold = threshold
        self._tests = [tokenize(t) for t in test_instructions]
        self._short_tests = [tuple(t) for t in self._tests if 0 < len(t) < n]
        self._grams: dict[int, set[tuple[str, ...]]] = {}

    def _test_grams(self, size: int) -> set[tuple[str, ...]]:
        if size not in self._grams:
            self._grams[size] = {
                tuple(words[i : i + size]) for words in self._tests for i in range(len(words) - size + 1)
            }
        return self._grams[size]

    def overlap(self, text: str) -> float:
        """Share (0..1) of ``text``'s n-grams found in the test split."""
        words = tokenize(text)
        if not words:
            return 0.0
        size = min(self.n, len(words))
        grams = [tuple(words[i : i + size]) for i in range(len(words) - size + 1)]
        known = self._test_grams(size)
        share = sum(1 for g in grams if g in known) / len(grams)
        for short in self._short_tests:
            if len(short) <= len(words) and _contains(words, short):
                share = max(share, len(short) / len(words))
        return share

    def is_contaminated(self, text: str) -> bool:
        """True when :meth:`overlap` reaches the threshold."""
        return self.overlap(text) >= self.threshold


def _contains(words: list[str], part: tuple[str, ...]) -> bool:
    k = len(part)
    return any(tuple(words[i : i + k]) == part for i in range(len(words) - k + 1))


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


# ------------------------------------------------------------------------------------------ seeds


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


# ------------------------------------------------------------------------------------------ synthesis


class _Filter:
    """Applies the filters in order and remembers what was kept."""

    def __init__(
        self,
        train: list[Example],
        test: list[Example],
        spec: SynthesisSpec,
        threshold: float,
        embeddings: EmbeddingFilter | None = None,
    ) -> None:
        self.seen = {text_hash(e.instruction) for e in train}
        self.near = NearDuplicateIndex(threshold)
        for e in train:
            self.near.add(f"train:{e.id}", e.instruction)
        self.decontaminator = Decontaminator(
            [e.instruction for e in test], spec.decontamination_ngram, spec.decontamination_overlap
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
        if self.decontaminator.is_contaminated(instruction) or (
            emb is not None and vector is not None and emb.is_contaminated(vector)
        ):
            self.removed["contaminated"] += 1
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


async def _call(
    provider: Provider,
    request: CompletionRequest,
    n: int,
    attempts: int,
    semaphore: asyncio.Semaphore,
    usage: list[Usage],
) -> tuple[list[Any] | None, str]:
    """One synthesis call with re-asks: ``(rows, "")`` or ``(None, why it failed)``."""
    messages = list(request.messages)
    error = ""
    for attempt in range(attempts):
        context = {**request.context, "seed": request.context["seed"] * 31 + attempt}
        try:
            async with semaphore:
                completion = await provider.complete(
                    request.model_copy(update={"messages": messages, "context": context})
                )
        except ProviderError as err:
            usage.append(Usage(calls=1))
            error = f"provider error: {err}"
            if not err.retryable:
                break
            continue
        except Exception as err:  # a provider bug must not crash the round
            usage.append(Usage(calls=1))
            error = f"provider raised {type(err).__name__}: {err}"
            continue
        usage.append(
            Usage(
                calls=1,
                input_tokens=completion.input_tokens,
                output_tokens=completion.output_tokens,
                cost=completion.cost,
                cached=int(completion.cached),
            )
        )
        try:
            return parse_reply(completion.text), ""
        except ValueError as err:
            error = f"invalid reply: {err}"
            messages = [
                *request.messages,
                ChatMessage(role="assistant", content=completion.text[:2000]),
                ChatMessage(role="user", content=_REASK.format(error=err, n=n)),
            ]
    return None, error


async def synthesize(
    train: list[Example],
    test: list[Example],
    request: SynthRequest,
    spec: SynthesisSpec,
    provider: Provider,
    round: int,
    seed: int,
    system_prompt: str,
    *,
    near_duplicate_threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    max_attempts: int = 3,
    embedder: SentenceEmbedder | None = None,
) -> SynthResult:
    """Generate up to ``request.samples`` new examples (``spec.samples_per_round`` if that is 0).

    Seeds come from ``train`` only (never ``test``), ``spec.seeds_per_call`` per call, without
    replacement and skipping ``request.exclude_seed_ids``. Each call asks for ``spec.examples_per_call``
    examples (fewer for the last). Calls run in waves of up to the provider's ``max_concurrency`` and
    are filtered in call order, so the result is deterministic for a deterministic provider. At most
    ``3 * ceil(target / examples_per_call) + 2`` calls are made; a wave in which every call failed ends
    the round early. Never raises for provider or reply problems.

    With ``spec.embedding_decontamination_threshold`` or ``spec.embedding_near_duplicate_threshold`` set,
    the embedding checks run with ``embedder`` (default: the process-wide packaged model, see
    :func:`llamaduo.data.embeddings.get_embedder`; a missing model raises
    :class:`llamaduo.data.embeddings.EmbeddingModelMissing` before any call is made).
    """
    target = request.samples if request.samples > 0 else spec.samples_per_round
    rng = random.Random(seed * 1_000_003 + round)
    by_id = {e.id: e for e in test}
    targets: list[str] = []
    if spec.strategy == "targeted":
        targets = [by_id[i].instruction for i in request.failed_item_ids if i in by_id]
    pool = SeedPool(train, set(request.exclude_seed_ids), rng, targets)
    embeddings: EmbeddingFilter | None = None
    if spec.embedding_decontamination_threshold is not None or spec.embedding_near_duplicate_threshold is not None:
        embeddings = await asyncio.to_thread(
            EmbeddingFilter,
            embedder or get_embedder(),
            [e.instruction for e in train],
            [e.instruction for e in test],
            spec.embedding_decontamination_threshold,
            spec.embedding_near_duplicate_threshold,
        )
    filters = _Filter(train, test, spec, near_duplicate_threshold, embeddings)
    semaphore = asyncio.Semaphore(provider.spec.limits.max_concurrency)
    max_calls = 3 * math.ceil(target / spec.examples_per_call) + 2
    result = SynthResult()
    if spec.strategy == "targeted" and not targets:
        result.notes.append("targeted strategy without failed test items: seeds drawn uniformly")
    usage: list[Usage] = []
    kept: list[Example] = []
    seed_ids: list[str] = []

    while len(kept) < target and result.calls < max_calls and train:
        wanted = target - len(kept)
        wave = min(
            provider.spec.limits.max_concurrency,
            math.ceil(wanted / spec.examples_per_call),
            max_calls - result.calls,
        )
        jobs = []
        for _ in range(wave):
            n = min(spec.examples_per_call, wanted)
            wanted -= n
            seeds = pool.draw(spec.seeds_per_call)
            seed_ids.extend(s.id for s in seeds)
            call_seed = (seed * 1_000_003 + round) * 10_007 + result.calls
            result.calls += 1
            req = CompletionRequest(
                purpose="synthesize",
                messages=build_messages(seeds, n, system_prompt),
                json_schema=SYNTH_SCHEMA,
                temperature=provider.spec.temperature,
                context={
                    "seeds": [s.model_dump() for s in seeds],
                    "n": n,
                    "seed": call_seed,
                    "system_prompt": system_prompt,
                },
            )
            jobs.append((n, _call(provider, req, n, max_attempts, semaphore, usage)))
        replies = await asyncio.gather(*(job for _, job in jobs))
        wave_failed = 0
        for (n, _), (rows, error) in zip(jobs, replies, strict=True):
            if rows is None:
                wave_failed += 1
                result.failed_calls += 1
                result.notes.append(f"call failed: {error}")
                continue
            result.generated += len(rows)
            if len(rows) > n:
                filters.removed["excess"] += len(rows) - n
            vectors = await asyncio.to_thread(filters.embed, rows[:n]) if filters.embeddings else {}
            for row in rows[:n]:
                if len(kept) >= target:
                    filters.removed["excess"] += 1
                    continue
                checked = filters.check(row, vectors)
                if checked:
                    instruction, response = checked
                    kept.append(
                        Example(
                            id=example_id(instruction, "syn"),
                            instruction=instruction,
                            response=response,
                            source=f"synthetic:{round}",
                        )
                    )
        if wave_failed == len(jobs):
            result.notes.append("every call of a wave failed: round ended early")
            break

    if not train:
        result.notes.append("no train examples to use as seeds")
    if pool.restarted:
        result.seed_pool_restarted = True
        result.notes.append("seed pool exhausted (all train seeds used by earlier rounds): started over")
    if len(kept) < target:
        result.notes.append(f"kept {len(kept)} of {target} wanted after {result.calls} calls")
    total = sum(usage, Usage())
    result.usage = total.model_copy(update={"simulated": provider.simulated})
    result.examples = kept
    result.kept = len(kept)
    result.removed = dict(sorted(filters.removed.items()))
    result.seed_ids = list(dict.fromkeys(seed_ids))
    return result
