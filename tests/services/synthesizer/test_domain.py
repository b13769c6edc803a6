"""The synthesizer domain: seeds from train only, validation with re-asks, and the filters."""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes.providers import Scripted

from llamaduo.contracts.events import SynthRequest
from llamaduo.contracts.spec import ProviderSpec, SynthesisSpec, TaskSpec
from llamaduo.data.examples import Example, example_id
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError, make_provider
from llamaduo.services.synthesizer.decontamination import Decontaminator
from llamaduo.services.synthesizer.domain import synthesize
from llamaduo.services.synthesizer.seeds import SeedPool
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
ROWS = make_dataset()
TRAIN = [
    Example(id=r["id"], instruction=r["instruction"], response=r["response"])
    for r in ROWS
    if r["split"] == "train"
]
TEST = [
    Example(id=r["id"], instruction=r["instruction"], response=r["response"])
    for r in ROWS
    if r["split"] == "test"
]


class Recording(Provider):
    """Wraps the simulated provider and records every request (a test double of a network LLM)."""

    def __init__(self) -> None:
        super().__init__(ProviderSpec(), TASK)
        self.inner = make_provider(ProviderSpec(), TASK)
        self.simulated = True
        self.name = self.inner.name
        self.requests: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        return await self.inner.complete(request)


def _run(
    provider: Provider,
    samples: int,
    spec: SynthesisSpec | None = None,
    round: int = 1,
    exclude: list[str] | None = None,
    failed: list[str] | None = None,
    train: list[Example] = TRAIN,
):
    request = SynthRequest(samples=samples, exclude_seed_ids=exclude or [], failed_item_ids=failed or [])
    return asyncio.run(
        synthesize(
            train,
            TEST,
            request,
            spec or SynthesisSpec(),
            provider,
            round=round,
            seed=7,
            system_prompt="Extract invoice fields as JSON.",
        )
    )


def test_simulated_synthesis_yields_valid_examples() -> None:
    provider = Recording()
    result = _run(provider, samples=24)
    assert result.kept == 24 == len(result.examples) and result.failed_calls == 0
    known = {e.instruction for e in TRAIN + TEST}
    for ex in result.examples:
        assert ex.response == oracle.answer(ex.instruction)
        assert json.loads(ex.response)["vendor"]
        assert ex.source == "synthetic:1" and ex.id == example_id(ex.instruction, "syn")
        assert ex.instruction not in known
    assert result.usage.simulated and result.usage.calls == result.calls == len(provider.requests)
    assert result.usage.input_tokens > 0 and result.usage.cost == 0
    assert result.generated == result.kept + sum(result.removed.values())
    again = _run(Recording(), samples=24)
    assert again.examples == result.examples  # deterministic


def test_seeds_come_from_train_only_and_are_not_reused() -> None:
    train_ids, test_ids = {e.id for e in TRAIN}, {e.id for e in TEST}
    provider = Recording()
    first = _run(provider, samples=40, round=1)
    prompted = [s["id"] for r in provider.requests for s in r.context["seeds"]]
    assert set(prompted) <= train_ids and not set(prompted) & test_ids
    assert len(prompted) == len(set(prompted)) == len(first.seed_ids)  # no reuse within a round
    assert all(len(r.context["seeds"]) == 4 for r in provider.requests)
    second = _run(Recording(), samples=40, round=2, exclude=first.seed_ids)
    assert set(second.seed_ids) <= train_ids and not set(second.seed_ids) & set(first.seed_ids)
    assert not first.seed_pool_restarted and not second.seed_pool_restarted


def test_seed_pool_starts_over_when_exhausted() -> None:
    small = TRAIN[:6]
    result = _run(Recording(), samples=12, train=small, exclude=[e.id for e in small[:5]])
    assert result.seed_pool_restarted and any("started over" in n for n in result.notes)
    assert set(result.seed_ids) <= {e.id for e in small} and result.kept == 12


def test_targeted_seeds_are_closest_to_failed_items() -> None:
    failed = [e for e in TEST if e.instruction.startswith("INVOICE")][:5]

    def header_share(strategy: str) -> float:
        provider = Recording()
        result = _run(
            provider, samples=16, spec=SynthesisSpec(strategy=strategy), failed=[e.id for e in failed]
        )
        assert set(result.seed_ids) <= {e.id for e in TRAIN}
        seeds = [s["instruction"] for r in provider.requests for s in r.context["seeds"]]
        return sum(s.startswith("INVOICE") for s in seeds) / len(seeds)

    targeted, uniform = header_share("targeted"), header_share("uniform")
    assert targeted >= 0.75 and targeted > uniform + 0.3, (targeted, uniform)


def _planted() -> tuple[list[dict], dict[str, int], list[dict]]:
    train, test = TRAIN[:6], TEST[:6]
    rows: list[dict] = []
    expected = {"duplicate": 0, "near_duplicate": 0, "contaminated": 0, "invalid": 0, "empty": 0}
    for e in train[:3]:  # exact duplicates of train, after normalisation
        rows.append({"instruction": "  " + e.instruction.upper() + " ", "response": e.response})
        expected["duplicate"] += 1
    for e in train[3:6]:  # near-duplicates: punctuation changed, one word added
        rows.append(
            {
                "instruction": e.instruction.replace(".", "!").replace(":", " -") + " Thanks",
                "response": e.response,
            }
        )
        expected["near_duplicate"] += 1
    for e in test[:3]:  # verbatim test items
        rows.append({"instruction": e.instruction, "response": e.response})
        expected["contaminated"] += 1
    for e in test[3:6]:  # test items with the ask reworded and a greeting added
        body = e.instruction.split("\n")[0]
        rows.append({"instruction": "Hello! " + body + "\nPlease give me JSON.", "response": e.response})
        expected["contaminated"] += 1
    controls = [{"instruction": t, "response": oracle.answer(t)} for t in oracle.propose([], 30, seed=99)]
    rows.extend(controls)
    rows.append(dict(controls[0]))  # a duplicate inside the batch
    expected["duplicate"] += 1
    rows += [{"instruction": 5, "response": "x"}, "just a string", {"instruction": "only"}]
    expected["invalid"] += 3
    rows += [{"instruction": "   ", "response": "x"}, {"instruction": "Invoice 1 from A", "response": ""}]
    expected["empty"] += 2
    return rows, expected, controls


def test_filters_remove_planted_rows_and_keep_clean_ones() -> None:
    rows, expected, controls = _planted()
    provider = Scripted(lambda n: json.dumps({"examples": rows if n == 1 else []}), TASK)
    spec = SynthesisSpec(examples_per_call=len(rows), samples_per_round=len(rows))
    result = _run(provider, samples=len(rows), spec=spec)
    kept = {e.instruction for e in result.examples}
    lost = [c["instruction"] for c in controls if c["instruction"] not in kept]
    false_removal = len(lost) / len(controls)
    assert false_removal == 0, f"false-removal rate {false_removal:.1%} on the clean control set: {lost}"
    assert result.removed == {k: v for k, v in expected.items() if v}, result.removed
    assert result.kept == len(controls) and result.generated == len(rows)


def test_bad_replies_are_reasked_then_used() -> None:
    good = json.dumps(
        {
            "examples": [
                {"instruction": t, "response": oracle.answer(t)} for t in oracle.propose([], 4, seed=3)
            ]
        }
    )
    replies = {1: "Sure, here you go: examples...", 2: '{"items": []}', 3: good}
    provider = Scripted(lambda n: replies.get(n, '{"examples": []}'), TASK)
    result = _run(provider, samples=4)
    assert result.kept == 4 and result.failed_calls == 0 and provider.calls == 3 and result.usage.calls == 3


def test_always_bad_replies_count_failed_calls_without_raising() -> None:
    provider = Scripted(lambda n: "not json at all", TASK)
    result = _run(provider, samples=8)
    assert result.kept == 0 and result.failed_calls == result.calls >= 1
    assert provider.calls == 3 * result.calls and any("call failed" in n for n in result.notes)


def test_provider_errors_count_failed_calls_without_raising() -> None:
    class Down(Provider):
        async def complete(self, request: CompletionRequest) -> Completion:
            raise ProviderError("quota exceeded", retryable=False)

    result = _run(Down(ProviderSpec(), TASK), samples=8)
    assert result.kept == 0 and result.failed_calls >= 1 and result.usage.calls == result.calls
    assert "quota exceeded" in " ".join(result.notes)


def test_decontaminator_short_texts_use_whole_sequence() -> None:
    d = Decontaminator(
        ["where is my parcel", "a much longer test instruction about a missing invoice total"],
        n=8,
        threshold=0.5,
    )
    assert d.is_contaminated("Where is my parcel?")  # shorter than n: whole sequence found in a test item
    assert d.is_contaminated("where is my parcel now")  # a short test item covering most of the text
    assert not d.is_contaminated("where is my refund")
    assert d.overlap("about a missing invoice total") == 1.0
    assert d.overlap("") == 0.0


def test_seed_pool_never_repeats_until_exhausted() -> None:
    import random

    pool = SeedPool(TRAIN[:10], exclude=set(), rng=random.Random(1))
    drawn = [e.id for _ in range(5) for e in pool.draw(2)]
    assert len(set(drawn)) == 10 and not pool.restarted
    assert len(pool.draw(2)) == 2 and pool.restarted


@pytest.mark.parametrize("samples", [1, 5])
def test_asks_for_no_more_than_needed(samples: int) -> None:
    provider = Recording()
    result = _run(provider, samples=samples)
    assert result.kept == samples
    assert sum(r.context["n"] for r in provider.requests) == samples
