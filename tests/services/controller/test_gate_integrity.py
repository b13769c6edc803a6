"""Gate integrity (issue 10, part 2): the controller's domain driven by hand-made events (no NATS, no S3)."""

from __future__ import annotations

import random

import pytest

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    Score,
    Subject,
    SynthReady,
    TrainDone,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import SpecError, parse_spec
from llamaduo.contracts.state import DataRefs, GateStats, MigrationState
from llamaduo.services.controller import domain
from llamaduo.services.controller.gate import aggregate

SPEC = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"gate": "similarity_mean", "threshold": 90, "batch_size": 10},
    "budget": {"max_rounds": 5},
}
DATA = DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                test=ArtifactRef(key="s", rows=50))


def begin(**over):
    spec = {**SPEC, **over}
    start = start_envelope("m-gate", spec)
    state, _ = domain.start(start, parse_spec(spec), DATA)
    return start, state


def kinds(outputs):
    return [o.type for o in outputs if o.type != Subject.MIGRATION_PROGRESS]


def run_round(state, cause, round, scores, batch_size=10, order=None):
    """train.done, infer.done, then the round's batches (in ``order`` of batch index); every output."""
    batches = [scores[i:i + batch_size] for i in range(0, len(scores), batch_size)]
    out = domain.on_train_done(state, cause.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key=f"a{round}"), rows=4), round=round))
    out += domain.on_infer_done(state, cause.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=len(scores), samples_per_prompt=1, batches=len(batches)),
        round=round))
    for b in order if order is not None else range(len(batches)):
        out += domain.on_eval_scored(state, cause.follow(Subject.EVAL_SCORED, EvalScored(
            batch=b, batches=len(batches), scores=batches[b], usage=Usage(calls=1)), round=round, key=f"b{b}"))
    return out


def ok(i, value):
    return Score(item_id=f"i{i}", similarity=value, precision=value)


def failed(i):
    return Score(item_id=f"i{i}", failed=True, reason="judging failed after 3 attempt(s): HTTP 503")


def test_49_of_50_failed_judgements_do_not_pass():
    start, state = begin(judge={**SPEC["judge"], "early_stopping": False})
    out = run_round(state, start, 0, [ok(0, 95)] + [failed(i) for i in range(1, 50)])
    assert Subject.MIGRATION_COMPLETED not in kinds(out)
    assert state.rounds[0].summary.decision != "pass"
    assert state.rounds[0].summary.aggregates["similarity_mean"] == 95  # the old gate would have passed


def test_a_judge_outage_stops_with_judge_unavailable_and_no_synthesis():
    start, state = begin()
    out = run_round(state, start, 0, [failed(i) for i in range(50)])
    assert Subject.SYNTH_REQUEST not in kinds(out)
    assert kinds(out).count(Subject.MIGRATION_FAILED) == 1
    failure = next(o for o in out if o.type == Subject.MIGRATION_FAILED).payload
    assert failure.reason == "judge_unavailable" and "judge.min_judged_fraction" in failure.detail
    assert state.outcome == "judge_unavailable" and state.rounds[0].judging_closed  # decided on batch 0


def test_a_few_failed_judgements_still_gate_normally():
    start, state = begin()
    out = run_round(state, start, 0, [failed(0), failed(1)] + [ok(i, 95) for i in range(2, 50)])
    assert kinds(out)[-1] == Subject.MIGRATION_COMPLETED
    start, state = begin(judge={**SPEC["judge"], "min_judged_fraction": 0.99})
    out = run_round(state, start, 0, [failed(0), failed(1)] + [ok(i, 95) for i in range(2, 50)])
    assert out[-1].payload.reason == "judge_unavailable"


def test_a_zero_yield_synthesis_round_ends_the_migration_keeping_the_best_round():
    start, state = begin()
    out = run_round(state, start, 0, [ok(i, 40) for i in range(50)])
    [synth] = [o for o in out if o.type == Subject.SYNTH_REQUEST]
    out = domain.on_synth_ready(state, synth.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=0), generated=64, kept=0, removed={"contaminated": 64}), key="ready"))
    assert kinds(out) == [Subject.MIGRATION_FAILED] and Subject.TRAIN_REQUEST not in kinds(out)
    assert out[-1].payload.reason == "synthesis_exhausted" and out[-1].payload.best_round == 0
    assert out[-1].payload.best_model.key == "a0" and len(state.rounds) == 1


def _synth(state, out, kept=10):
    [synth] = [o for o in out if o.type == Subject.SYNTH_REQUEST]
    return domain.on_synth_ready(state, synth.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key=f"s{synth.round}", rows=kept), generated=kept, kept=kept), key="ready"))


def test_plateau_stops():
    start, state = begin(budget={"max_rounds": 10, "patience": 2, "min_gain": 2.0})
    out = run_round(state, start, 0, [ok(i, 50) for i in range(50)])
    _synth(state, out)
    out = run_round(state, start, 1, [ok(i, 60) for i in range(50)])  # +10: progress
    _synth(state, out)
    out = run_round(state, start, 2, [ok(i, 61) for i in range(50)])  # +1 < min_gain, patience left
    assert kinds(out) == [Subject.SYNTH_REQUEST]
    _synth(state, out)
    out = run_round(state, start, 3, [ok(i, 59) for i in range(50)])  # 2 rounds without +2: plateau
    assert kinds(out) == [Subject.MIGRATION_FAILED] and out[-1].payload.reason == "plateau"
    assert out[-1].payload.best_round == 2 and state.rounds[3].summary.decision == "stop"


def test_without_patience_there_is_no_plateau_stop():
    start, state = begin(budget={"max_rounds": 10})
    out = run_round(state, start, 0, [ok(i, 50) for i in range(50)])
    _synth(state, out)
    assert kinds(run_round(state, start, 1, [ok(i, 50) for i in range(50)])) == [Subject.SYNTH_REQUEST]


@pytest.mark.parametrize(("over", "field"), [
    ({"judge": {"judgements_per_answer": 3}}, "judge.judgements_per_answer"),
    ({"judge": {"judgements_per_answer": 3}, "judge_provider": {"temperature": 0}}, "judge_provider.temperature"),
    ({"student": {"base_model": "tiny:llama", "inference": {"samples_per_prompt": 4}}},
     "student.inference.samples_per_prompt"),
])
def test_draws_at_temperature_zero_are_refused_naming_the_field(over, field):
    with pytest.raises(SpecError) as err:
        parse_spec({**SPEC, **over})
    assert field in str(err.value) and "temperature" in str(err.value)


def test_draws_above_temperature_zero_are_accepted():
    spec = parse_spec({**SPEC, "judge": {"judgements_per_answer": 3}, "teacher": {"temperature": 0.7},
                       "student": {"base_model": "tiny:llama", "inference": {"samples_per_prompt": 4,
                                                                              "temperature": 0.8}}})
    assert spec.judge.judgements_per_answer == 3 and spec.student.inference.samples_per_prompt == 4
    spec = parse_spec({**SPEC, "judge": {"judgements_per_answer": 3, "method": "programmatic"}})
    assert spec.judge.judgements_per_answer == 3  # a checker calls no LLM: nothing collapses


def test_coverage_for_precision_and_either_may_gate():
    scores = [Score(item_id=f"i{i}", similarity=s, precision=p)
              for i, (s, p) in enumerate([(80, 40), (60, 75), (30, 90), (90, 20)])]
    agg = aggregate(scores)
    assert (agg["coverage_50"], agg["coverage_70"]) == (75.0, 50.0)
    assert (agg["precision_coverage_50"], agg["precision_coverage_70"]) == (50.0, 50.0)
    start, state = begin(judge={"gate": "precision_coverage_70", "threshold": 80, "batch_size": 10,
                                "early_stopping": False})
    out = run_round(state, start, 0, [ok(i, 75) for i in range(45)] + [ok(i, 40) for i in range(45, 50)])
    assert kinds(out)[-1] == Subject.MIGRATION_COMPLETED
    assert state.rounds[0].summary.aggregates["precision_coverage_70"] == 90.0


def test_early_stopping_with_fast_cached_batches_first_decides_as_in_published_order():
    """Cached answers (unchanged since the last round, usually right) come back first. Taken in arrival
    order, the early sample looks far better than the round; taken in published order it does not."""
    rng = random.Random(7)
    batches, size = 40, 10
    cached = {b for b in range(batches) if b % 2 == 0}  # spread over the published (random) order
    scores = [ok(b * size + j, 100 if b in cached else rng.randint(30, 60))
              for b in range(batches) for j in range(size)]
    judge = {"gate": "similarity_mean", "threshold": 85, "batch_size": size, "confidence": 0.95}
    published_order = list(range(batches))
    arrival_order = sorted(cached) + sorted(set(range(batches)) - cached)

    start, published = begin(judge=judge)
    run_round(published, start, 0, scores, batch_size=size, order=published_order)
    start, arrived = begin(judge=judge)
    run_round(arrived, start, 0, scores, batch_size=size, order=arrival_order)
    a, b = published.rounds[0].summary, arrived.rounds[0].summary
    assert a.decision == b.decision == "continue"  # the round's mean is ~72.5 < 85
    assert (a.judged, a.early_stopped, a.aggregates, a.gate_interval) == (
        b.judged, b.early_stopped, b.aggregates, b.gate_interval)


def test_state_size_does_not_grow_with_the_answers():
    """The KV value holds statistics and a 1-bit-per-batch bitmap, never per-answer scores."""
    sizes = []
    for answers in (100, 5000):
        start, state = begin(judge={**SPEC["judge"], "early_stopping": False, "batch_size": 100}, budget={
            "max_rounds": 3})
        for r in range(3):
            out = run_round(state, start, r, [ok(i, 50 + i % 40) for i in range(answers)], batch_size=100)
            if r < 2:
                _synth(state, out)
        sizes.append(len(MigrationState.model_dump_json(state)))
    assert sizes[1] - sizes[0] < 200, sizes  # 50x the answers: a few bitmap bytes more


def test_gate_stats_add_up():
    a = GateStats.from_scores([ok(0, 90), failed(1)])
    b = GateStats.from_scores([ok(2, 40)])
    assert (a + b) == GateStats.from_scores([ok(0, 90), failed(1), ok(2, 40)])
    assert (a + b).answers == 3 and (a + b).judged == 2


def test_batches_far_ahead_of_the_prefix_are_re_read_once_and_decide_the_same():
    """Only PENDING_KEEP out-of-order batches are kept in the state; the rest are re-read (from S3 in the app)."""
    scores = [ok(i, 40 + (i * 7) % 60) for i in range(300)]
    start, in_order = begin(judge={**SPEC["judge"], "early_stopping": False})
    run_round(in_order, start, 0, scores)
    start, reversed_ = begin(judge={**SPEC["judge"], "early_stopping": False})
    batches = [scores[i:i + 10] for i in range(0, 300, 10)]
    loads = []

    def load(round, batch):
        loads.append(batch)
        return GateStats.from_scores(batches[batch])

    run_round(reversed_, start, 0, [], order=[])  # train.done + infer.done only
    reversed_.rounds[0].to_judge = 300
    for b in reversed(range(30)):
        domain.on_eval_scored(reversed_, start.follow(Subject.EVAL_SCORED, EvalScored(
            batch=b, batches=30, scores=batches[b]), key=f"b{b}"), load)
        assert len(reversed_.rounds[0].pending) <= 8
    assert sorted(loads) == list(range(1, 30 - 8))  # each batch not kept is read back exactly once
    assert reversed_.rounds[0].summary.aggregates == in_order.rounds[0].summary.aggregates
