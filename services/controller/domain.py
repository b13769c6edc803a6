"""The controller's state machine: plain functions from (state, event) to (state, commands).

No I/O here. The bus adapter loads the state from the KV store, calls one of these, saves the state with the
returned envelopes in its outbox, publishes them, then clears the outbox; every envelope's id is
deterministic, so a crash between saving and publishing re-publishes the same ids and JetStream drops copies.

Every handler is idempotent on its own (a redelivered event changes nothing): a judged batch is applied once
(the round's bitmap), train/infer results once per round, synthetic data once per round.

Per ``eval.scored`` the work is constant in the size of the round: the batch is reduced to its
:class:`GateStats` once and added to running sums; the in-order prefix (published order) grows by the
batches it reaches, each looked at once by the sequential test.
"""

from __future__ import annotations

from collections.abc import Callable

from llamaduo.contracts.events import (
    CANCELLED_REASON,
    Envelope,
    EvalScored,
    InferDone,
    MigrationCancel,
    MigrationFailed,
    RoundSummary,
    Stage,
    Subject,
    SynthReady,
    SynthRequest,
    TrainDone,
    TrainRequest,
)
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.contracts.state import PENDING_KEEP, DataRefs, GateStats, MigrationState, RoundState
from llamaduo.services.controller.early_stopping import GateInterval, Verdict, sequential_decision
from llamaduo.services.controller.ending import (
    baseline_end,
    final,
    holdout_end,
    on_baseline_scored,
    on_holdout_scored,
)
from llamaduo.services.controller.ending import end as _end
from llamaduo.services.controller.ending import progress as _progress
from llamaduo.services.controller.gate import aggregate_stats
from llamaduo.storage.keys import batch_scores_prefix

Outputs = list[Envelope]
#: Statistics of batch ``batch`` of round ``round``, read back from its S3 object (the bus adapter's I/O).
BatchLoader = Callable[[int, int], GateStats]


def start(cause: Envelope, spec: MigrationSpec, data: DataRefs) -> tuple[MigrationState, Outputs]:
    """A new migration whose data is in the store: train round 0 on the coverage split."""
    state = MigrationState(
        migration_id=cause.migration_id,
        correlation_id=cause.correlation_id,
        spec=spec.model_dump(mode="json"),
        data=data,
    )
    state.mark_applied(cause.event_id)
    rows = data.coverage.rows or 0
    state.rounds.append(RoundState(round=0, datasets=[data.coverage], train_rows=rows))
    return state, [
        _progress(state, cause, 0, Stage.TRAINING, f"{rows} rows"),
        cause.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=[data.coverage], rows=rows), round=0,
                     key="train"),
    ]


def on_train_done(state: MigrationState, event: Envelope[TrainDone]) -> Outputs:
    rnd = state.current(event.round)
    if rnd is None or state.done or state.ending or rnd.adapter is not None:
        return []
    rnd.adapter = event.payload.adapter
    rnd.merged = event.payload.merged
    rnd.train_loss = event.payload.train_loss
    rnd.rows_too_long = event.payload.rows_too_long
    return [_progress(state, event, event.round, Stage.INFERENCE)]


def on_infer_done(state: MigrationState, event: Envelope[InferDone]) -> Outputs:
    rnd = state.current(event.round)
    if rnd is None or state.done or state.ending or rnd.predictions is not None:
        return []
    rnd.predictions = event.payload.predictions
    rnd.batches = event.payload.batches
    total = event.payload.prompts * event.payload.samples_per_prompt
    rnd.to_judge = total
    if rnd.summary is not None:  # judged (and closed) before infer.done got here
        return []
    return [_progress(state, event, event.round, Stage.JUDGING, judged=rnd.totals.answers, to_judge=total)]


def on_eval_scored(state: MigrationState, event: Envelope[EvalScored], load: BatchLoader | None = None) -> Outputs:
    """Collect one judged batch; gate the round when it is complete, or earlier when the sequential test
    decides it (``judge.early_stopping``) on the in-order prefix of batches, or end the migration when judging
    ran out of budget or the judge failed on too many answers (``judge.min_judged_fraction``).

    A batch of a round already closed (early) is not scored; its service usage still counts, once. ``load``
    reads back a batch that arrived ahead of the prefix when the state did not keep its statistics (more than
    ``PENDING_KEEP`` ahead); each batch is loaded at most once, so the work stays flat on average.
    """
    split = getattr(event.payload, "split", "eval")
    if split == "holdout":
        return on_holdout_scored(state, event)
    if split == "baseline":
        return on_baseline_scored(state, event)
    rnd = state.current(event.round)
    p = event.payload
    if rnd is None or state.done or rnd.has_batch(p.batch):
        return []  # unknown round, finished migration, or a batch counted already
    rnd.mark_batch(p.batch)
    if rnd.summary is not None:
        rnd.late_count += 1
        rnd.usage = rnd.usage + p.usage
        state.usage = state.usage + p.usage
        return []
    if state.ending:  # the migration ended (a failure) while this round was open: nothing more is decided
        return []
    stats = GateStats.from_scores(p.scores)
    rnd.totals = rnd.totals + stats
    rnd.batches = p.batches
    rnd.usage = rnd.usage + p.usage
    rnd.judge_provider = p.provider
    rnd.budget_exhausted = rnd.budget_exhausted or p.budget_exhausted
    state.usage = state.usage + p.usage
    spec = state.parsed_spec
    judge = spec.judge
    complete = rnd.received_count >= p.batches
    # to_judge comes with infer.done; a batch may be scored before that arrives: then bound it
    to_judge = rnd.to_judge if rnd.to_judge is not None else p.batches * judge.batch_size
    verdict: Verdict | None = None
    interval: GateInterval | None = None
    while rnd.prefix_batches < p.batches and rnd.has_batch(rnd.prefix_batches):  # published order: each prefix
        b = rnd.prefix_batches                                                   # is looked at once
        batch_stats = stats if b == p.batch else rnd.pending.pop(b, None)
        if batch_stats is None:
            if load is None:
                raise ValueError(f"round {rnd.round} batch {b}: statistics not kept and no loader to re-read them")
            batch_stats = load(rnd.round, b)
        rnd.prefix = rnd.prefix + batch_stats
        rnd.prefix_batches += 1
        prefix = rnd.prefix
        if (verdict is None and not complete and judge.early_stopping
                and prefix.judged >= judge.min_judged_fraction * prefix.answers):
            verdict, interval = sequential_decision(
                prefix, judge.gate, judge.threshold, to_judge=to_judge, looks=p.batches,
                confidence=judge.confidence, min_judged=judge.min_judged)
            if verdict is not None:
                break
    if verdict is None and p.batch >= rnd.prefix_batches and len(rnd.pending) < PENDING_KEEP:
        rnd.pending[p.batch] = stats  # ahead of the prefix: kept until it gets there (or re-read from S3)
    if verdict is not None:
        rnd.pending.clear()  # the rest of the round is never looked at
    if verdict is not None:
        rnd.judging_closed = True
        return _close_round(state, rnd, event, rnd.prefix, answers=rnd.prefix.answers, verdict=verdict,
                            interval=interval, budget_exhausted=rnd.budget_exhausted)
    if rnd.budget_exhausted:
        rnd.judging_closed = not complete
        return _close_round(state, rnd, event, rnd.totals, answers=to_judge, budget_exhausted=True)
    if rnd.totals.failed > (1.0 - judge.min_judged_fraction) * to_judge:
        rnd.judging_closed = not complete  # the round can no longer reach the judged share: stop now
        return _close_round(state, rnd, event, rnd.totals, answers=to_judge)
    if not complete:
        return [_progress(state, event, event.round, Stage.JUDGING, detail=f"batch {rnd.received_count}",
                          judged=rnd.totals.answers)]
    rnd.pending.clear()
    answers = max(rnd.to_judge or 0, rnd.totals.answers)  # every batch is in: without infer.done, all it had
    return _close_round(state, rnd, event, rnd.totals, answers=answers)


def _plateau(state: MigrationState, gate: str) -> str | None:
    """Why the migration stopped improving (``budget.patience``, ``budget.min_gain``), or None."""
    budget = state.parsed_spec.budget
    values = [r.summary.aggregates.get(gate, 0.0) for r in state.rounds if r.summary]
    if budget.patience is None or len(values) <= budget.patience:
        return None
    before, recent = max(values[:-budget.patience]), max(values[-budget.patience:])
    if recent >= before + budget.min_gain:
        return None
    return (f"{gate} did not rise by budget.min_gain {budget.min_gain} over {budget.patience} round(s) "
            f"(best before {before:.1f}, since {recent:.1f}): plateau")


def _close_round(state: MigrationState, rnd: RoundState, cause: Envelope, stats: GateStats, *, answers: int,
                 verdict: Verdict | None = None, interval: GateInterval | None = None,
                 budget_exhausted: bool = False) -> Outputs:
    """Gate the round on ``stats`` of its judged answers out of ``answers``: all of them, or (``verdict``) the
    sequential test's decision on a prefix, or (``budget_exhausted``) a part that the budget cut short, which
    fails the migration; too small a judged share fails it as ``judge_unavailable``."""
    spec = state.parsed_spec
    judge = spec.judge
    agg = aggregate_stats(stats)
    value = agg.get(judge.gate, 0.0)
    judged_share = stats.judged / answers if answers else 0.0
    enough = judged_share >= judge.min_judged_fraction
    passed = enough and ((verdict == "above") if verdict is not None else (value >= judge.threshold
                                                                            and not budget_exhausted))
    budget = spec.budget
    over_tokens = budget.max_service_tokens is not None and state.usage.tokens >= budget.max_service_tokens
    over_cost = budget.max_cost is not None and state.usage.cost >= budget.max_cost
    out_of_budget = over_tokens or over_cost or budget_exhausted
    last_round = rnd.round + 1 >= budget.max_rounds
    to_judge = rnd.to_judge if rnd.to_judge is not None else answers
    rnd.summary = RoundSummary(
        round=rnd.round, train_rows=rnd.train_rows, synthetic_rows=rnd.synthetic_rows, adapter=rnd.adapter,
        train_loss=rnd.train_loss, aggregates={k: float(v) for k, v in agg.items()},
        judged=stats.judged, failed_judgements=stats.failed, to_judge=to_judge, gate_metric=judge.gate,
        threshold=judge.threshold, decision="pass" if passed else "continue", early_stopped=verdict is not None,
        gate_interval=(interval.low, interval.high) if interval is not None and verdict is not None else None,
        confidence=judge.confidence if verdict is not None else None, usage=rnd.usage,
        rows_too_long=rnd.rows_too_long, synthesis_removed=rnd.synthesis_removed,
    )
    plateau = None if passed or last_round or out_of_budget or not enough else _plateau(state, judge.gate)
    stop = not passed and (last_round or out_of_budget or not enough or plateau is not None)
    rnd.summary.decision = "pass" if passed else ("stop" if stop else "continue")
    if passed:
        return _end(state, cause, rnd, "completed")
    if stop:
        if budget_exhausted:
            return fail(state, cause, "budget", (
                f"judging round {rnd.round} stopped at {stats.answers}/{to_judge} answers: the next service "
                f"call would have exceeded the budget (spent {state.usage.tokens} tokens / "
                f"{state.usage.cost:.4f} cost)"))
        if not enough:
            return fail(state, cause, "judge_unavailable", (
                f"round {rnd.round}: the judge scored {stats.judged} of {answers} answers ({judged_share:.0%}), "
                f"below judge.min_judged_fraction {judge.min_judged_fraction}; {stats.failed} judgements failed "
                f"after the judge's retries (see their reasons under "
                f"{batch_scores_prefix(state.migration_id, rnd.round)}); fix the judge provider and start again"))
        if out_of_budget:
            return fail(state, cause, "budget", f"service usage {state.usage.tokens} tokens / "
                        f"{state.usage.cost:.4f} cost reached the budget")
        if plateau is not None:
            return fail(state, cause, "plateau", plateau)
        return fail(state, cause, "max_rounds",
                    f"{judge.gate} {value:.1f} < {judge.threshold} after {rnd.round + 1} rounds")
    nxt = rnd.round + 1
    return [
        _progress(state, cause, nxt, Stage.SYNTHESIS, f"round {nxt}"),
        cause.follow(Subject.SYNTH_REQUEST, SynthRequest(
            samples=spec.synthesis.samples_per_round, exclude_seed_ids=list(state.used_seed_ids),
            scores_round=rnd.round,
        ), round=nxt, key="synth"),
    ]


def on_synth_ready(state: MigrationState, event: Envelope[SynthReady]) -> Outputs:
    """New synthetic data: train the next round on coverage + every synthetic set so far."""
    if state.done or state.ending or event.round != len(state.rounds):
        return []
    p = event.payload
    if p.budget_exhausted:
        state.usage = state.usage + p.usage
        return fail(state, event, "budget", f"synthesis for round {event.round} stopped after {p.kept} examples: "
                    f"the next teacher call would have exceeded the budget (spent {state.usage.tokens} tokens "
                    f"/ {state.usage.cost:.4f} cost)")
    if p.kept == 0 or p.dataset.rows == 0:
        state.usage = state.usage + p.usage
        return fail(state, event, "synthesis_exhausted",
                    f"synthesis for round {event.round} kept 0 of {p.generated} generated examples (removed: "
                    f"{p.removed or 'none'}): retraining on the same data cannot improve; the best round is kept")
    state.synthetic.append(p.dataset)
    state.used_seed_ids.extend(i for i in p.seed_ids if i not in state.used_seed_ids)
    state.usage = state.usage + p.usage
    datasets = [state.data.coverage, *state.synthetic]
    rows = sum(d.rows or 0 for d in datasets)
    synthetic_rows = sum(d.rows or 0 for d in state.synthetic)
    state.rounds.append(RoundState(round=event.round, datasets=datasets, train_rows=rows,
                                   synthetic_rows=synthetic_rows, usage=p.usage, synthesis_removed=p.removed))
    return [
        _progress(state, event, event.round, Stage.TRAINING, f"{rows} rows"),
        event.follow(Subject.TRAIN_REQUEST, TrainRequest(datasets=datasets, rows=rows), key="train"),
    ]


def fail(state: MigrationState, cause: Envelope, reason: str, detail: str) -> Outputs:
    """End the migration as failed, keeping its best model so far (after judging the holdout with it, see
    :func:`~.ending.end`). While the holdout is being judged (work of it dead-lettered), end at once with the
    gate result and a note: the holdout never changes the outcome. While the baseline is (``only_if_better``),
    complete without promoting: the model could not be shown better."""
    if state.done:
        return []
    if state.stage == Stage.BASELINE:
        return baseline_end(state, cause, note=f"baseline not judged in full: {detail}")
    if state.ending:
        return holdout_end(state, cause, note=f"holdout not judged in full: {detail}")
    current = state.rounds[-1] if state.rounds else None
    if current is not None and current.batches is not None and current.batches_outstanding:
        current.judging_closed = True  # judges skip what is left of this round
    return _end(state, cause, state.best_round(), reason, detail)


def cancel(state: MigrationState, event: Envelope[MigrationCancel]) -> Outputs:
    """``migration.cancel``: end now as ``cancelled`` (stage cancelled, ``migration.failed`` reason
    ``cancelled``), keeping the best round so far as the model; the open round's outstanding judge batches
    are skipped, no holdout is judged; during the baseline stage it ends cancelled too (nothing promoted). A
    finished (or already cancelled) migration is left as it is."""
    if state.done:
        return []
    who = f" by {event.payload.requested_by}" if event.payload.requested_by else ""
    detail = f"cancelled{who}" + (f": {event.payload.reason}" if event.payload.reason else "")
    if state.stage == Stage.BASELINE and state.baseline is not None:  # passed, comparing: end it as cancelled
        return final(state, event, state.rounds[state.baseline.round], CANCELLED_REASON, detail)
    if state.ending and state.holdout is not None:  # the holdout was being judged: stop that too
        state.holdout.outcome, state.holdout.detail = CANCELLED_REASON, detail
    return fail(state, event, CANCELLED_REASON, detail)


def failed_before_start(cause: Envelope, reason: str, detail: str) -> Envelope:
    """``migration.failed`` for a migration refused before it had any state (bad spec or data)."""
    return cause.follow(Subject.MIGRATION_FAILED, MigrationFailed(reason=reason, detail=detail), key="failed")
