"""The controller's state machine: plain functions from (state, event) to (state, commands).

No I/O here. The bus adapter loads the state from the KV store, calls one of these, publishes the returned
envelopes, then saves the state; every envelope's id is deterministic, so a crash between publishing and
saving re-publishes the same ids and JetStream drops the copies.
"""

from __future__ import annotations

from llamaduo.contracts.events import (
    ArtifactRef,
    Envelope,
    EvalScored,
    InferDone,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgress,
    RoundSummary,
    Score,
    Stage,
    Subject,
    SynthReady,
    SynthRequest,
    TrainDone,
    TrainRequest,
)
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.contracts.state import DataRefs, MigrationState, RoundState
from llamaduo.services.controller.early_stopping import GateInterval, Verdict, sequential_decision
from llamaduo.services.controller.gate import aggregate
from llamaduo.storage.keys import migration_key

Outputs = list[Envelope]


def _progress(state: MigrationState, cause: Envelope, round: int, stage: Stage, detail: str = "",
              **counts: int) -> Envelope:
    state.stage = stage
    return cause.follow(Subject.MIGRATION_PROGRESS, MigrationProgress(stage=stage, detail=detail, **counts),
                        round=round, key=f"progress-{stage}-{detail}")


def start(cause: Envelope, spec: MigrationSpec, data: DataRefs) -> tuple[MigrationState, Outputs]:
    """A new migration whose data is in the store: train round 0 on the coverage split."""
    state = MigrationState(
        migration_id=cause.migration_id,
        correlation_id=cause.correlation_id,
        spec=spec.model_dump(mode="json"),
        data=data,
        applied=[cause.event_id],
    )
    rows = data.coverage.rows or 0
    state.rounds.append(RoundState(round=0, datasets=[data.coverage], train_rows=rows))
    return state, [
        _progress(state, cause, 0, Stage.TRAINING, f"{rows} rows"),
        cause.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[data.coverage], rows=rows), round=0,
                     key="train"),
    ]


def on_train_done(state: MigrationState, event: Envelope[TrainDone]) -> Outputs:
    rnd = state.current(event.round)
    if rnd is None or state.done:
        return []
    rnd.adapter = event.payload.adapter
    rnd.merged = event.payload.merged
    rnd.train_loss = event.payload.train_loss
    return [_progress(state, event, event.round, Stage.INFERENCE)]


def on_infer_done(state: MigrationState, event: Envelope[InferDone]) -> Outputs:
    rnd = state.current(event.round)
    if rnd is None or state.done:
        return []
    rnd.predictions = event.payload.predictions
    rnd.batches = event.payload.batches
    total = event.payload.prompts * event.payload.samples_per_prompt
    rnd.to_judge = total
    if rnd.summary is not None:  # judged (and closed) before infer.done got here
        return []
    judged = sum(len(s) for s in rnd.scores.values())
    return [_progress(state, event, event.round, Stage.JUDGING, judged=judged, to_judge=total)]


def on_eval_scored(state: MigrationState, event: Envelope[EvalScored]) -> Outputs:
    """Collect one judged batch; gate the round when it is complete, or earlier when the sequential test
    decides it (``judge.early_stopping``), or fail the migration when judging ran out of budget.

    A batch of a round already closed (early) is not scored; its service usage still counts, once.
    """
    rnd = state.current(event.round)
    p = event.payload
    if rnd is None or state.done or p.batch in rnd.scores:
        return []  # unknown round, finished migration, or a batch counted already
    if rnd.summary is not None:
        if p.batch not in rnd.late_batches:
            rnd.late_batches.append(p.batch)
            rnd.usage = rnd.usage + p.usage
            state.usage = state.usage + p.usage
        return []
    rnd.scores[p.batch] = p.scores
    rnd.batches = p.batches
    rnd.usage = rnd.usage + p.usage
    rnd.judge_provider = p.provider
    rnd.budget_exhausted = rnd.budget_exhausted or p.budget_exhausted
    state.usage = state.usage + p.usage
    judged = sum(len(s) for s in rnd.scores.values())
    spec = state.parsed_spec
    complete = len(rnd.scores) >= p.batches
    verdict: Verdict | None = None
    interval: GateInterval | None = None
    if not complete and spec.judge.early_stopping:
        # to_judge comes with infer.done; a batch may be scored before that arrives: then bound it
        to_judge = rnd.to_judge if rnd.to_judge is not None else p.batches * spec.judge.batch_size
        verdict, interval = sequential_decision(
            _round_scores(rnd), spec.judge.gate, spec.judge.threshold, to_judge=to_judge, looks=p.batches,
            confidence=spec.judge.confidence, min_judged=spec.judge.min_judged)
    if verdict is not None:
        rnd.judging_closed = True
        return _close_round(state, rnd, event, verdict=verdict, interval=interval,
                            budget_exhausted=rnd.budget_exhausted)
    if rnd.budget_exhausted:
        rnd.judging_closed = not complete
        return _close_round(state, rnd, event, budget_exhausted=True)
    if not complete:
        return [_progress(state, event, event.round, Stage.JUDGING, detail=f"batch {len(rnd.scores)}",
                          judged=judged)]
    return _close_round(state, rnd, event)


def _round_scores(rnd: RoundState) -> list[Score]:
    return [s for batch in sorted(rnd.scores) for s in rnd.scores[batch]]


def _close_round(state: MigrationState, rnd: RoundState, cause: Envelope, *, verdict: Verdict | None = None,
                 interval: GateInterval | None = None, budget_exhausted: bool = False) -> Outputs:
    """Gate the round on its judged answers: all of them, or (``verdict``) the sequential test's decision
    on a part, or (``budget_exhausted``) a part that the budget cut short, which fails the migration."""
    spec = state.parsed_spec
    scores = _round_scores(rnd)
    agg = aggregate(scores)
    value = agg.get(spec.judge.gate, 0.0)
    passed = (verdict == "above") if verdict is not None else (value >= spec.judge.threshold
                                                                and not budget_exhausted)
    budget = spec.budget
    over_tokens = budget.max_service_tokens is not None and state.usage.tokens >= budget.max_service_tokens
    over_cost = budget.max_cost is not None and state.usage.cost >= budget.max_cost
    out_of_budget = over_tokens or over_cost or budget_exhausted
    last_round = rnd.round + 1 >= budget.max_rounds
    decision = "pass" if passed else ("stop" if (last_round or out_of_budget) else "continue")
    to_judge = rnd.to_judge if rnd.to_judge is not None else len(scores)
    rnd.summary = RoundSummary(
        round=rnd.round, train_rows=rnd.train_rows, synthetic_rows=rnd.synthetic_rows, adapter=rnd.adapter,
        train_loss=rnd.train_loss, aggregates={k: float(v) for k, v in agg.items()},
        judged=int(agg.get("judged", len(scores))), failed_judgements=int(agg.get("failed", 0)),
        to_judge=to_judge, gate_metric=spec.judge.gate, threshold=spec.judge.threshold, decision=decision,
        early_stopped=verdict is not None,
        gate_interval=(interval.low, interval.high) if interval is not None and verdict is not None else None,
        confidence=spec.judge.confidence if verdict is not None else None, usage=rnd.usage,
    )
    summaries = [r.summary for r in state.rounds if r.summary]
    if passed:
        state.stage, state.outcome = Stage.COMPLETED, "completed"
        return [cause.follow(Subject.MIGRATION_COMPLETED, MigrationCompleted(
            model=rnd.adapter or ArtifactRef(key=""), best_round=rnd.round, rounds=summaries, usage=state.usage,
            report=ArtifactRef(key=migration_key(state.migration_id, "report", "report.html")),
        ), key="completed")]
    if decision == "stop":
        reason = "budget" if out_of_budget else "max_rounds"
        if reason == "max_rounds":
            detail = f"{spec.judge.gate} {value:.1f} < {spec.judge.threshold} after {rnd.round + 1} rounds"
        elif budget_exhausted:
            detail = (f"judging round {rnd.round} stopped at {len(scores)}/{to_judge} answers: the next service "
                      f"call would have exceeded the budget (spent {state.usage.tokens} tokens / "
                      f"{state.usage.cost:.4f} cost)")
        else:
            detail = f"service usage {state.usage.tokens} tokens / {state.usage.cost:.4f} cost reached the budget"
        return fail(state, cause, reason, detail)
    failed_ids = sorted({s.item_id for s in scores if s.failed or (s.similarity or 0) < 50})
    nxt = rnd.round + 1
    return [
        _progress(state, cause, nxt, Stage.SYNTHESIS, f"round {nxt}"),
        cause.follow(Subject.SYNTH_REQUEST, SynthRequest(
            samples=spec.synthesis.samples_per_round, exclude_seed_ids=list(state.used_seed_ids),
            failed_item_ids=failed_ids,
        ), round=nxt, key="synth"),
    ]


def on_synth_ready(state: MigrationState, event: Envelope[SynthReady]) -> Outputs:
    """New synthetic data: train the next round on coverage + every synthetic set so far."""
    if state.done or event.round != len(state.rounds):
        return []
    p = event.payload
    if p.budget_exhausted:
        state.usage = state.usage + p.usage
        return fail(state, event, "budget", f"synthesis for round {event.round} stopped after {p.kept} examples: "
                    f"the next teacher call would have exceeded the budget (spent {state.usage.tokens} tokens "
                    f"/ {state.usage.cost:.4f} cost)")
    state.synthetic.append(p.dataset)
    state.used_seed_ids.extend(i for i in p.seed_ids if i not in state.used_seed_ids)
    state.usage = state.usage + p.usage
    datasets = [state.data.coverage, *state.synthetic]
    rows = sum(d.rows or 0 for d in datasets)
    synthetic_rows = sum(d.rows or 0 for d in state.synthetic)
    state.rounds.append(RoundState(round=event.round, datasets=datasets, train_rows=rows,
                                   synthetic_rows=synthetic_rows, usage=p.usage))
    return [
        _progress(state, event, event.round, Stage.TRAINING, f"{rows} rows"),
        event.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=datasets, rows=rows), key="train"),
    ]


def fail(state: MigrationState, cause: Envelope, reason: str, detail: str) -> Outputs:
    """End the migration as failed, keeping its best model so far."""
    if state.done:
        return []
    current = state.rounds[-1] if state.rounds else None
    if current is not None and current.batches is not None and current.batches_outstanding:
        current.judging_closed = True  # judges skip what is left of this round
    best = state.best_round()
    state.stage, state.outcome = Stage.FAILED, reason
    return [cause.follow(Subject.MIGRATION_FAILED, MigrationFailed(
        reason=reason, detail=detail, best_model=best.adapter if best else None,
        best_round=best.round if best else None, rounds=[r.summary for r in state.rounds if r.summary],
        usage=state.usage,
    ), key="failed")]


def failed_before_start(cause: Envelope, reason: str, detail: str) -> Envelope:
    """``migration.failed`` for a migration refused before it had any state (bad spec or data)."""
    return cause.follow(Subject.MIGRATION_FAILED, MigrationFailed(reason=reason, detail=detail), key="failed")
