"""``migration.cancel`` in the controller's state machine: in each stage, twice, after the end (no NATS, no S3)."""

from llamaduo.contracts.events import (
    CANCELLED_REASON,
    ArtifactRef,
    EvalScored,
    InferDone,
    MigrationCancel,
    MigrationFailed,
    Score,
    Stage,
    Subject,
    TrainDone,
    cancel_envelope,
    outcome_of,
)
from llamaduo.contracts.state import MigrationState
from llamaduo.services.controller import domain
from tests.services.controller.test_domain import begin, kinds, score_round
from tests.services.controller.test_holdout import begin as begin_with_holdout
from tests.services.controller.test_holdout import synth


def cancel(state: MigrationState, reason: str = "wrong teacher", by: str = "ada@host"):
    return domain.cancel(state, cancel_envelope(state.migration_id, state.correlation_id, reason, by))


def the_failed(outputs) -> MigrationFailed:
    assert kinds(outputs) == [Subject.MIGRATION_FAILED], outputs
    assert outcome_of(outputs[-1]) == "cancelled"
    return outputs[-1].payload


def test_cancel_while_round_zero_trains_ends_cancelled_without_a_model():
    _start, state, _ = begin()
    failed = the_failed(cancel(state))
    assert failed.reason == CANCELLED_REASON and failed.best_model is None and failed.best_round is None
    assert failed.detail == "cancelled by ada@host: wrong teacher"
    assert state.stage == Stage.CANCELLED and state.outcome == CANCELLED_REASON and state.done


def test_cancel_in_round_one_keeps_round_zero_and_nothing_of_the_migration_moves_afterwards():
    start, state, _ = begin()
    score_round(state, start, 0, [60, 60, 60, 60])  # below the gate: round 1 is being synthesized
    assert state.stage == Stage.SYNTHESIS
    failed = the_failed(cancel(state))
    assert failed.best_round == 0 and failed.best_model == ArtifactRef(key="a0")
    assert [r.decision for r in failed.rounds] == ["continue"]
    assert state.stage == Stage.CANCELLED
    # late results of the migration change nothing
    assert domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, synth_ready(), round=1)) == []
    assert domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key="a1"), rows=4), round=1)) == []
    assert state.stage == Stage.CANCELLED and len(state.rounds) == 1


def synth_ready():
    from llamaduo.contracts.events import SynthReady

    return SynthReady(dataset=ArtifactRef(key="s1", rows=4), generated=4, kept=4)


def test_cancel_while_judging_closes_the_open_round_and_keeps_the_best_judged_one():
    start, state, _ = begin()
    score_round(state, start, 0, [70, 70, 70, 70])
    domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, synth_ready(), round=1))
    # round 1: trained, answered, one of its two batches judged
    domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a1"), rows=8),
                                             round=1))
    domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=4, samples_per_prompt=1, batches=2), round=1))
    domain.on_eval_scored(state, start.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=2, scores=[
        Score(item_id=f"i{j}", similarity=95, precision=95) for j in range(2)]), round=1, key="b0"))
    rnd = state.rounds[1]
    assert rnd.summary is None and rnd.batches_outstanding
    failed = the_failed(cancel(state))
    assert failed.best_round == 0 and failed.best_model.key == "a0"
    assert rnd.judging_closed  # judge workers skip what is left of the round


def test_cancel_during_the_holdout_ends_cancelled_with_the_chosen_round_and_a_note():
    start, state = begin_with_holdout()
    score_round(state, start, 0, [1, 1, 1, 1])
    synth(state, start, 1)
    out = score_round(state, start, 1, [100, 100, 95, 90])
    assert kinds(out) == [Subject.INFER_REQUEST] and state.stage == Stage.HOLDOUT
    failed = the_failed(cancel(state, reason=""))
    assert failed.best_round == 1 and failed.best_model.key == "a1" and failed.detail == "cancelled by ada@host"
    assert "holdout not judged in full" in failed.rounds[1].holdout_note
    assert state.stage == Stage.CANCELLED


def test_cancel_does_not_start_the_holdout():
    start, state = begin_with_holdout()
    score_round(state, start, 0, [60, 60, 60, 60])
    failed = the_failed(cancel(state))
    assert failed.best_round == 0
    assert failed.rounds[0].holdout_note == "holdout not judged: the migration was cancelled"


def test_cancelling_twice_publishes_one_terminal_event():
    start, state, _ = begin()
    score_round(state, start, 0, [60, 60, 60, 60])
    assert len(cancel(state)) == 1
    assert cancel(state) == [] and cancel(state, reason="again") == []
    assert state.stage == Stage.CANCELLED


def test_cancel_after_completion_or_failure_changes_nothing():
    start, state, _ = begin()
    out = score_round(state, start, 0, [100, 100, 100, 100])
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    assert cancel(state) == [] and state.stage == Stage.COMPLETED and state.outcome == "completed"

    start, state, _ = begin({**begin.__defaults__[0], "budget": {"max_rounds": 1}})
    out = score_round(state, start, 0, [10, 10, 10, 10])
    assert the_outcome(out) == "failed"
    assert cancel(state) == [] and state.stage == Stage.FAILED and state.outcome == "max_rounds"


def the_outcome(outputs) -> str:
    return outcome_of([o for o in outputs if o.type != Subject.MIGRATION_PROGRESS][-1])


def test_the_cancel_command_is_one_event_per_migration():
    a = cancel_envelope("m-1", "c", "x")
    b = cancel_envelope("m-1", "c", "y", "someone")
    assert a.event_id == b.event_id and a.type == Subject.MIGRATION_CANCEL
    assert isinstance(b.payload, MigrationCancel) and b.payload.requested_by == "someone"
    assert cancel_envelope("m-2", "c").event_id != a.event_id
