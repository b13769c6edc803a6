"""The controller's state machine, driven by hand-made events (no NATS, no S3)."""

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    MigrationCompleted,
    MigrationFailed,
    Score,
    Stage,
    Subject,
    SynthReady,
    SynthRequest,
    TrainDone,
    TrainRequest,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs, MigrationState
from llamaduo.services.controller import domain

SPEC = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"gate": "similarity_mean", "threshold": 90},
    "budget": {"max_rounds": 3},
}
DATA = DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                       test=ArtifactRef(key="s", rows=4))


def begin(spec=SPEC):
    start = start_envelope("m-1", spec)
    state, out = domain.start(start, parse_spec(spec), DATA)
    return start, state, out


def kinds(outputs):
    return [o.type for o in outputs if o.type != Subject.MIGRATION_PROGRESS]


def score_round(state, cause, round, sims, batches=2, merged=None):
    """Send the round's train.done, infer.done and eval.scored batches; return the last outputs."""
    domain.on_train_done(state, cause.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key=f"a{round}"), rows=4, merged=merged), round=round))
    domain.on_infer_done(state, cause.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=len(sims), samples_per_prompt=1, batches=batches), round=round))
    per = len(sims) // batches
    out = []
    for b in range(batches):
        scores = [Score(item_id=f"i{b * per + j}", similarity=s, precision=s)
                  for j, s in enumerate(sims[b * per:(b + 1) * per])]
        out = domain.on_eval_scored(state, cause.follow(Subject.EVAL_SCORED, EvalScored(
            batch=b, batches=batches, scores=scores, usage=Usage(calls=len(scores), input_tokens=10)),
            round=round, key=f"b{b}"))
    return out


def test_start_requests_round_zero_training_on_coverage():
    _start, state, out = begin()
    assert kinds(out) == [Subject.TRAIN_REQUEST]
    req = out[-1]
    assert isinstance(req.payload, TrainRequest) and req.payload.rows == 4 and req.round == 0
    assert state.stage == Stage.TRAINING


def test_below_threshold_asks_for_synthesis_with_failed_items():
    start, state, _ = begin()
    out = score_round(state, start, 0, [100, 100, 1, 1])
    assert kinds(out) == [Subject.SYNTH_REQUEST]
    req = out[-1].payload
    assert isinstance(req, SynthRequest) and out[-1].round == 1
    assert req.scores_round == 0 and req.failed_item_ids == []  # the synthesizer reads them from S3
    assert state.rounds[0].summary.aggregates["similarity_mean"] == 50.5
    assert state.rounds[0].summary.decision == "continue"


def test_partial_batches_do_not_close_and_a_redelivered_batch_counts_once():
    start, state, _ = begin()
    score_round(state, start, 0, [100, 100, 1, 1], batches=2)
    judged = state.rounds[0].summary.judged
    again = start.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=2, scores=[
        Score(item_id="i0", similarity=1, precision=1)]), round=0, key="dup")
    assert domain.on_eval_scored(state, again) == []
    assert state.rounds[0].summary.judged == judged == 4


def test_synthetic_data_accumulates_and_passing_round_completes():
    start, state, _ = begin()
    score_round(state, start, 0, [1, 1, 1, 1])
    ready = start.follow(Subject.SYNTH_READY, SynthReady(dataset=ArtifactRef(key="s1", rows=10), generated=12,
                                                         kept=10, seed_ids=["a", "b"]), round=1)
    out = domain.on_synth_ready(state, ready)
    assert kinds(out) == [Subject.TRAIN_REQUEST]
    assert [d.key for d in out[-1].payload.datasets] == ["c", "s1"] and out[-1].payload.rows == 14
    assert state.used_seed_ids == ["a", "b"]
    out = score_round(state, start, 1, [100, 100, 95, 90])
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    done = out[-1].payload
    assert isinstance(done, MigrationCompleted) and done.best_round == 1 and done.model.key == "a1"
    assert [r.decision for r in done.rounds] == ["continue", "pass"]
    assert state.done and domain.on_eval_scored(state, out[-1]) == []


def test_max_rounds_fails_and_keeps_best_model():
    start, state, _ = begin({**SPEC, "budget": {"max_rounds": 2}})
    score_round(state, start, 0, [60, 60, 60, 60])
    domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=4), generated=4, kept=4), round=1))
    out = score_round(state, start, 1, [50, 50, 50, 50])
    assert kinds(out) == [Subject.MIGRATION_FAILED]
    failed = out[-1].payload
    assert isinstance(failed, MigrationFailed) and failed.reason == "max_rounds"
    assert failed.best_round == 0 and failed.best_model.key == "a0"


def test_token_budget_stops_the_loop():
    start, state, _ = begin({**SPEC, "budget": {"max_rounds": 5, "max_service_tokens": 15}})
    out = score_round(state, start, 0, [1, 1, 1, 1])
    assert kinds(out) == [Subject.MIGRATION_FAILED] and out[-1].payload.reason == "budget"


def test_state_survives_serialisation():
    start, state, _ = begin()
    score_round(state, start, 0, [100, 1, 100, 1])
    again = MigrationState.model_validate_json(state.model_dump_json())
    assert again == state and again.rounds[0].totals.judged == 4 and again.rounds[0].has_batch(1)
    assert "scores" not in state.rounds[0].model_dump()  # per-answer scores live in S3, not in the state


def test_a_round_scored_before_infer_done_keeps_its_stage():
    """Judge batches can all be scored before the controller sees infer.done (separate consumers)."""
    start, state, _ = begin()
    domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a0"), rows=4)))
    for b in range(2):
        domain.on_eval_scored(state, start.follow(Subject.EVAL_SCORED, EvalScored(batch=b, batches=2, scores=[
            Score(item_id=f"i{b}{j}", similarity=10, precision=10) for j in range(2)]), key=f"b{b}"))
    assert state.rounds[0].summary.decision == "continue" and state.stage == Stage.SYNTHESIS
    out = domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=4, samples_per_prompt=1, batches=2)))
    assert out == [] and state.stage == Stage.SYNTHESIS and state.rounds[0].to_judge == 4


def test_small_rounds_are_never_early_stopped():
    """Fewer answers than judge.min_judged: the round is gated on every answer, as before."""
    start, state, _ = begin()
    score_round(state, start, 0, [1, 1, 1, 1], batches=4)
    s = state.rounds[0].summary
    assert s.judged == 4 and not s.early_stopped and s.gate_interval is None
    assert not state.rounds[0].judging_closed


def test_the_chosen_rounds_merged_model_is_kept_and_listed():
    from llamaduo.reporting.manifest import manifest

    start, state, _ = begin()
    score_round(state, start, 0, [1, 1, 1, 1], merged=ArtifactRef(key="m0", sha256="00"))
    assert state.rounds[0].merged == ArtifactRef(key="m0", sha256="00")
    assert manifest(state)["merged_model"] is None  # listed once the migration is over
    assert manifest(state)["best_round"] == 0  # the best so far, from MigrationState.best_round
    domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=10), generated=10, kept=10), round=1))
    out = score_round(state, start, 1, [100, 100, 95, 90], merged=ArtifactRef(key="m1", sha256="11"))
    assert kinds(out) == [Subject.MIGRATION_COMPLETED] and state.done
    assert manifest(state)["merged_model"] == ArtifactRef(key="m1", sha256="11").model_dump(mode="json")
    assert manifest(state)["best_round"] == 1


def test_a_round_closed_early_without_its_predictions_file_lists_none(store):  # type: ignore[no-untyped-def]
    from llamaduo.reporting.manifest import PREDICTIONS_NOT_WRITTEN, write_manifest
    from llamaduo.storage.keys import migration_key, predictions_key

    start, state, _ = begin()
    score_round(state, start, 0, [1, 1, 1, 1])
    domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
        dataset=ArtifactRef(key="s1", rows=10), generated=10, kept=10), round=1))
    score_round(state, start, 1, [50, 50, 50, 50])
    mid = state.migration_id
    for rnd in state.rounds:  # both closed early; only round 1's shards were all answered and joined
        rnd.judging_closed = True
        rnd.predictions = ArtifactRef(key=predictions_key(mid, rnd.round))
    store.put_jsonl(predictions_key(mid, 1), [])
    write_manifest(store, state)
    rounds = store.get_json(migration_key(mid, "manifest.json"))["rounds"]
    assert rounds[0]["predictions"] is None and rounds[0]["predictions_note"] == PREDICTIONS_NOT_WRITTEN
    assert rounds[1]["predictions"]["key"] == predictions_key(mid, 1) and "predictions_note" not in rounds[1]
