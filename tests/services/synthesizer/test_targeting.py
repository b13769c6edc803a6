"""Targeted synthesis reads the eval split only, never the holdout (asserted by ids); decontamination uses both."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from fakes.providers import Scripted
from faststream.nats import TestNatsBroker

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Score, Subject, SynthRequest, parse_event, start_envelope
from llamaduo.contracts.spec import JudgeSpec, SynthesisSpec, TaskSpec, parse_spec
from llamaduo.data.examples import Example, example_id
from llamaduo.services.synthesizer import domain
from llamaduo.services.synthesizer.app import register as register_synth
from llamaduo.services.synthesizer.seeds import SeedPool, falls_short, shortfalls_worst_first
from llamaduo.storage.keys import batch_scores_key, batch_scores_prefix, data_key, spec_key
from llamaduo.tasks.invoice import make_dataset, make_item_like, oracle, style_of

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
ROWS = make_dataset(n_train=40, n_test=20, seed=9)
TRAIN = [Example(**{k: r[k] for k in ("id", "instruction", "response")}) for r in ROWS if r["split"] == "train"]
TESTS = [Example(**{k: r[k] for k in ("id", "instruction", "response")}) for r in ROWS if r["split"] == "test"]
EVAL, HOLDOUT = TESTS[:12], TESTS[12:]


@pytest.fixture
def targets_seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the items whose instructions the targeted seed pool was given (a spy on :class:`SeedPool`)."""
    by_instruction = {e.instruction: e.id for e in TESTS}
    seen: list[str] = []

    class Spy(SeedPool):
        def __init__(self, train, exclude, rng, targets=None):  # type: ignore[no-untyped-def]
            seen.extend(by_instruction.get(t, f"unknown:{t[:20]}") for t in targets or [])
            super().__init__(train, exclude, rng, targets)

    monkeypatch.setattr(domain, "SeedPool", Spy)
    return seen


def test_failed_holdout_ids_are_never_targets_but_holdout_rows_are_decontaminated(targets_seen: list[str]) -> None:
    rows = [{"instruction": e.instruction, "response": e.response} for e in HOLDOUT[:3]]  # holdout copies
    rows += [{"instruction": t, "response": oracle.answer(t)} for t in oracle.propose([], 5, seed=3)]
    provider = Scripted(lambda n: json.dumps({"examples": rows if n == 1 else []}), TASK)
    spec = SynthesisSpec(strategy="targeted", examples_per_call=len(rows), samples_per_round=len(rows))
    failed = [EVAL[0].id, EVAL[3].id, *(e.id for e in HOLDOUT)]  # holdout ids smuggled into the request
    result = asyncio.run(domain.synthesize(TRAIN, EVAL, SynthRequest(samples=len(rows), failed_item_ids=failed),
                                           spec, provider, round=1, seed=7, system_prompt="", holdout=HOLDOUT))
    assert targets_seen == [EVAL[0].id, EVAL[3].id]
    assert result.removed.get("contaminated", 0) + result.removed.get("contaminated_response", 0) >= 3
    assert not {e.instruction for e in result.examples} & {e.instruction for e in HOLDOUT}
    assert not set(result.seed_ids) & {e.id for e in TESTS}


SPEC = parse_spec({
    "task": {"name": "invoices", "oracle": "llamaduo.tasks.invoice:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "synthesis": {"samples_per_round": 8, "examples_per_call": 4, "seeds_per_call": 2, "strategy": "targeted"},
})


async def test_adapter_targets_eval_failures_only_and_never_reads_holdout_scores(  # type: ignore[no-untyped-def]
        settings, store, targets_seen, monkeypatch) -> None:
    mid = "m-targets"
    store.put_json(spec_key(mid), SPEC.model_dump(mode="json"))
    store.put_jsonl(data_key(mid, "train"), TRAIN)
    store.put_jsonl(data_key(mid, "test"), EVAL)
    store.put_jsonl(data_key(mid, "holdout"), HOLDOUT)
    store.put_jsonl(batch_scores_key(mid, 0, 0), [Score(item_id=EVAL[1].id, similarity=10, precision=10),
                                                  Score(item_id=EVAL[2].id, similarity=90, precision=90),
                                                  Score(item_id=EVAL[3].id, similarity=85, precision=85),
                                                  Score(item_id=EVAL[4].id, failed=True)])
    store.put_jsonl(batch_scores_key(mid, 0, 0, "holdout"), [Score(item_id=e.id, similarity=1, precision=1)
                                                             for e in HOLDOUT])
    assert not batch_scores_key(mid, 0, 0, "holdout").startswith(batch_scores_prefix(mid, 0))
    read: list[str] = []
    read_models = store.read_models

    def spy(key, model):  # type: ignore[no-untyped-def]
        read.append(key)
        return read_models(key, model)

    monkeypatch.setattr(store, "read_models", spy)
    bus = Bus(settings, "synthesizer")
    register_synth(bus, store)
    req = start_envelope(mid, {}).follow(Subject.SYNTH_REQUEST, SynthRequest(samples=8, scores_round=0), round=1,
                                         key="s")
    async with TestNatsBroker(bus.broker) as br:
        await br.publish(req.to_bytes(), settings.subject(Subject.SYNTH_REQUEST))
        mock = bus.publisher(Subject.SYNTH_READY).mock
        assert mock is not None
        [ready] = [parse_event(call.args[0]) for call in mock.call_args_list]
    # the eval items below the gate's bar (similarity_mean >= 90: 10, 85 and a failed judgement, not 90), worst
    # first; no holdout item, though all of them "failed"
    assert targets_seen == [EVAL[4].id, EVAL[1].id, EVAL[3].id]
    assert data_key(mid, "holdout") in read  # read for decontamination only
    assert not [k for k in read if "/holdout/" in k]  # holdout scores and predictions never read
    assert ready.payload.kept > 0


@pytest.mark.parametrize(("gate", "threshold", "score", "short"), [
    ("similarity_mean", 90, Score(item_id="a", similarity=89, precision=100), True),
    ("similarity_mean", 90, Score(item_id="a", similarity=90, precision=1), False),
    ("precision_mean", 80, Score(item_id="a", similarity=100, precision=79), True),
    ("coverage_70", 95, Score(item_id="a", similarity=70, precision=1), False),  # a coverage's bar is its cut
    ("coverage_70", 95, Score(item_id="a", similarity=69, precision=100), True),
    ("precision_coverage_50", 60, Score(item_id="a", similarity=1, precision=50), False),
    ("similarity_mean", 90, Score(item_id="a", failed=True), True),
])
def test_an_answer_falls_short_of_the_bar_one_answer_must_clear(gate: str, threshold: float, score: Score,
                                                                short: bool) -> None:
    assert falls_short(score, JudgeSpec(gate=gate, threshold=threshold)) is short  # type: ignore[arg-type]


def test_shortfalls_come_worst_first_each_item_by_its_worst_judgement() -> None:
    judge = JudgeSpec(gate="similarity_mean", threshold=90)
    scores = [Score(item_id="b", similarity=85, precision=85), Score(item_id="a", similarity=40, precision=40),
              Score(item_id="c", similarity=95, precision=95), Score(item_id="d", failed=True),
              Score(item_id="b", similarity=20, precision=20), Score(item_id="e", similarity=85, precision=85)]
    assert shortfalls_worst_first(scores, judge) == ["d", "b", "a", "e"]


def _invoice(amount: str, vendor: str = "Acme Supplies GmbH", num: str = "INV-2024-0042") -> Example:
    text = f"INVOICE {num} | {vendor} | Date: 2024-03-05 | Total: {amount}\nReturn the invoice fields as JSON."
    return Example(id=example_id(text, "t"), instruction=text, response=oracle.answer(text))


def test_the_nearest_seed_is_written_like_the_failure_not_only_with_its_words() -> None:
    # the same words and numbers in both train rows; only the european row writes the amount as the target does
    us, european = _invoice("EUR 1,234.50"), _invoice("1.234,50 EUR")
    target = _invoice("9.870,10 EUR", vendor="Globex Labs AB", num="INV-2025-0777")
    for shuffle in range(5):
        pool = SeedPool([us, european], set(), random.Random(shuffle), [target.instruction])
        assert pool.draw(1) == [european]


def test_every_failure_gets_its_nearest_seed_before_any_gets_a_second() -> None:
    headers = [e for e in TRAIN if e.instruction.startswith("INVOICE")]
    other = next(e for e in TRAIN if e.instruction.startswith("Reminder"))
    like_other = make_item_like(random.Random(1), style_of(other.instruction))[0]  # type: ignore[arg-type]
    failures = [*(e.instruction for e in headers[:4]), like_other]  # four failures like many rows, one like one
    pool = SeedPool([*headers, other], set(), random.Random(0), failures)
    first = pool.draw(5)
    assert first[:4] == headers[:4] and first[4] == other  # the last failure's nearest row, dealt in its turn


def test_the_pool_is_ordered_and_drawn_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # ordering compares every failure with every train row (seconds for a large split): never on the loop's thread
    threads: list[str] = []

    class Spy(SeedPool):
        def _order(self, examples):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread().name)
            return super()._order(examples)

    monkeypatch.setattr(domain, "SeedPool", Spy)
    rows = [{"instruction": t, "response": oracle.answer(t)} for t in oracle.propose([], 2, seed=5)]
    provider = Scripted(lambda n: json.dumps({"examples": rows}), TASK)
    spec = SynthesisSpec(strategy="targeted", examples_per_call=2, samples_per_round=8, seeds_per_call=3)

    async def run() -> str:
        await domain.synthesize(TRAIN[:4], EVAL, SynthRequest(samples=8, failed_item_ids=[EVAL[0].id]), spec,
                                provider, round=1, seed=1, system_prompt="")
        return threading.current_thread().name

    loop_thread = asyncio.run(run())
    assert len(threads) >= 2 and loop_thread not in threads  # built, then ordered again when the pool ran dry


def test_a_train_id_given_twice_is_dealt_once_and_the_pool_is_still_ordered() -> None:
    ordered: list[list[Example]] = []
    worker = threading.Thread(target=lambda: ordered.append(
        SeedPool([TRAIN[0], TRAIN[0], TRAIN[1]], set(), random.Random(0), [TRAIN[1].instruction]).draw(3)),
        daemon=True)
    worker.start()
    worker.join(10)
    assert ordered == [[TRAIN[1], TRAIN[0]]]  # the nearest first; two different seeds are all there are
