"""The end of a migration: the chosen round's adapter answers the holdout, judged once in full, reported beside
the gate score, never changing a decision (domain only: no NATS, no S3)."""

import copy

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferRequest,
    MigrationCompleted,
    MigrationFailed,
    Score,
    Stage,
    Subject,
    SynthReady,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs
from llamaduo.services.controller import domain
from tests.services.controller.test_domain import SPEC, kinds, score_round

DATA = DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                test=ArtifactRef(key="s", rows=4), holdout=ArtifactRef(key="h", rows=4))


def begin(spec=SPEC, data=DATA):
    start = start_envelope("m-1", spec)
    state, _ = domain.start(start, parse_spec(spec), data)
    return start, state


def synth(state, start, round, rows=4):
    return domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key=f"s{round}", rows=rows), generated=rows, kept=rows), round=round))


def holdout_scored(request, batch, sims, batches=2, failed=False):
    """The judge's reply to holdout batch ``batch`` of the infer.request ``request``."""
    scores = [Score(item_id=f"h{batch}-{j}", failed=True) if failed else
              Score(item_id=f"h{batch}-{j}", similarity=s, precision=s) for j, s in enumerate(sims)]
    return request.follow(Subject.EVAL_SCORED, EvalScored(batch=batch, batches=batches, scores=scores,
                                                          usage=Usage(calls=len(sims)), split="holdout"),
                          key=f"holdout-{batch}")


def test_holdout_is_requested_only_at_the_end_for_the_passing_round_and_reported_beside_the_gate():
    start, state = begin()
    out = score_round(state, start, 0, [1, 1, 1, 1])
    assert kinds(out) == [Subject.SYNTH_REQUEST]  # a round that continues asks for no holdout
    synth(state, start, 1)
    out = score_round(state, start, 1, [100, 100, 95, 90])
    assert kinds(out) == [Subject.INFER_REQUEST]  # the decision is taken: holdout first, final event after
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    assert isinstance(request.payload, InferRequest) and request.payload.split == "holdout"
    assert request.round == 1 and request.payload.adapter.key == "a1"
    assert state.stage == Stage.HOLDOUT and not state.done and state.rounds[1].summary.decision == "pass"
    assert kinds(domain.on_eval_scored(state, holdout_scored(request, 0, [40, 60]))) == []
    out = domain.on_eval_scored(state, holdout_scored(request, 1, [50, 50]))
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    done = out[-1].payload
    assert isinstance(done, MigrationCompleted) and done.best_round == 1 and done.model.key == "a1"
    assert [r.decision for r in done.rounds] == ["continue", "pass"]  # a low holdout score changes nothing
    chosen = done.rounds[1]
    assert chosen.holdout_aggregates["similarity_mean"] == 50.0 and chosen.aggregates["similarity_mean"] == 96.25
    assert (chosen.holdout_judged, chosen.holdout_to_judge, chosen.holdout_note) == (4, 4, "")
    assert done.rounds[0].holdout_aggregates == {} and state.done and state.stage == Stage.COMPLETED
    assert done.usage.calls == state.usage.calls and state.usage.calls >= 4  # holdout judging is counted


def test_a_stop_judges_the_holdout_with_the_best_round_and_keeps_its_reason():
    start, state = begin({**SPEC, "budget": {"max_rounds": 2}})
    score_round(state, start, 0, [80, 80, 80, 80])
    synth(state, start, 1)
    out = score_round(state, start, 1, [50, 50, 50, 50])
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    assert request.round == 0 and request.payload.adapter.key == "a0"  # the best round, not the last
    domain.on_eval_scored(state, holdout_scored(request, 0, [100, 100]))
    out = domain.on_eval_scored(state, holdout_scored(request, 1, [100, 100]))
    assert kinds(out) == [Subject.MIGRATION_FAILED]
    failed = out[-1].payload
    assert isinstance(failed, MigrationFailed) and failed.reason == "max_rounds" and failed.best_round == 0
    assert [r.decision for r in failed.rounds] == ["continue", "stop"]  # a perfect holdout passes nothing
    assert failed.rounds[0].holdout_aggregates["similarity_mean"] == 100.0
    assert failed.rounds[1].holdout_aggregates == {} and state.outcome == "max_rounds"


def test_synthesis_exhausted_also_ends_through_the_holdout():
    start, state = begin()
    score_round(state, start, 0, [70, 70, 70, 70])
    out = domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=0), generated=8, kept=0), round=1))
    assert kinds(out) == [Subject.INFER_REQUEST] and out[-1].round == 0
    assert domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=4), generated=4, kept=4), round=1, key="late")) == []


def test_holdout_is_exactly_once_under_redelivery():
    start, state = begin()
    score_round(state, start, 0, [95, 95, 95, 95], batches=2)
    # the last eval.scored redelivered: no second infer.request
    last = start.follow(Subject.EVAL_SCORED, EvalScored(batch=1, batches=2, scores=[]), round=0, key="b1")
    assert domain.on_eval_scored(state, last) == []
    request = start.follow(Subject.INFER_REQUEST, InferRequest(adapter=ArtifactRef(key="a0")), round=0)
    first = holdout_scored(request, 0, [80, 80])
    before = copy.deepcopy(state)
    out = domain.on_eval_scored(state, first)
    assert domain.on_eval_scored(state, first) == []  # redelivered batch: counted once
    assert state.holdout.received_count == 1 and state.holdout.stats.judged == 2
    final = holdout_scored(request, 1, [60, 60])
    again = copy.deepcopy(state)
    out = domain.on_eval_scored(state, final)
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    # a crash before the state was saved: the same event re-run publishes the same ids (JetStream drops copies)
    assert [o.event_id for o in domain.on_eval_scored(again, final)] == [o.event_id for o in out]
    twin = copy.deepcopy(before)
    assert [o.event_id for o in domain.on_eval_scored(before, first)] == [
        o.event_id for o in domain.on_eval_scored(twin, first)]
    assert domain.on_eval_scored(state, final) == [] and domain.on_eval_scored(state, first) == []
    assert out[-1].payload.rounds[0].holdout_aggregates["similarity_mean"] == 70.0


def test_holdout_batches_of_another_round_or_before_the_end_are_ignored():
    start, state = begin()
    score_round(state, start, 0, [10, 10, 10, 10])
    early = holdout_scored(start.follow(Subject.INFER_REQUEST, InferRequest(adapter=ArtifactRef(key="a0"))), 0, [99])
    assert domain.on_eval_scored(state, early) == [] and state.holdout is None  # no holdout asked for yet
    assert state.rounds[0].summary.decision == "continue" and state.rounds[0].received_count == 2


def test_judge_failing_on_the_holdout_ends_with_the_gate_result_and_a_note():
    start, state = begin()
    out = score_round(state, start, 0, [95, 95, 95, 95])
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    domain.on_eval_scored(state, holdout_scored(request, 0, [0, 0], failed=True))
    out = domain.on_eval_scored(state, holdout_scored(request, 1, [0, 0], failed=True))
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    chosen = out[-1].payload.rounds[0]
    assert chosen.decision == "pass" and chosen.holdout_aggregates == {} and chosen.holdout_judged == 0
    assert "judge failed on 4 of 4 holdout answers" in chosen.holdout_note


def test_dead_lettered_holdout_work_ends_at_once_with_the_gate_result():
    start, state = begin()
    out = score_round(state, start, 0, [95, 95, 95, 95])
    [request] = [o for o in out if o.type == Subject.INFER_REQUEST]
    domain.on_eval_scored(state, holdout_scored(request, 0, [70, 70]))
    out = domain.fail(state, request, "dead_letter", "judge.request dead-lettered by judge: error after 5 deliveries")
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]  # the gate passed: the holdout cannot change that
    chosen = out[-1].payload.rounds[0]
    assert chosen.holdout_judged == 2 and chosen.holdout_aggregates["similarity_mean"] == 70.0
    assert "holdout not judged in full: judge.request dead-lettered" in chosen.holdout_note
    assert domain.on_eval_scored(state, holdout_scored(request, 1, [70, 70])) == [] and state.done


def test_no_holdout_split_or_a_spent_budget_ends_at_once():
    start, state = begin(data=DATA.model_copy(update={"holdout": None}))
    assert kinds(score_round(state, start, 0, [95, 95, 95, 95])) == [Subject.MIGRATION_COMPLETED]
    start, state = begin({**SPEC, "budget": {"max_rounds": 3, "max_service_tokens": 10}})
    out = score_round(state, start, 0, [50, 50, 50, 50])
    assert kinds(out) == [Subject.MIGRATION_FAILED] and out[-1].payload.reason == "budget"
    assert "the service budget is spent" in out[-1].payload.rounds[0].holdout_note
