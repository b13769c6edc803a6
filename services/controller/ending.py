"""How a migration ends, once its decision is taken (plain functions, no I/O, like :mod:`.domain`).

1. **Holdout** (stage ``holdout``): with a holdout split, the chosen round's adapter answers it and the judge scores
   all of it; the aggregates go beside the gate score. Never changes a decision.
2. **Baseline** (stage ``baseline``, only for a completed migration whose spec sets
   ``promotion.only_if_better``): the route's current version answers this migration's eval split and is judged
   like a round (same split, judge settings and gate aggregate, all of it). The domain only enters the stage; the
   bus adapter looks up the route's current version and copies its adapter under this migration's prefix in the
   same transition, then calls :func:`begin_baseline`. The model is promoted only when its gate value is strictly
   greater than the baseline's; otherwise the migration still completes with ``promotion: kept_current``.
3. **Final event**: ``migration.completed`` (with ``promotion`` and the baseline's result) or ``migration.failed``.
"""

from __future__ import annotations

from llamaduo.contracts.events import (
    CANCELLED_REASON,
    ArtifactRef,
    BaselineResult,
    Envelope,
    EvalScored,
    InferRequest,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgress,
    Promotion,
    Stage,
    Subject,
)
from llamaduo.contracts.state import BaselineState, GateStats, HoldoutState, MigrationState, RoundState
from llamaduo.services.controller.gate import aggregate_stats
from llamaduo.storage.keys import migration_key

Outputs = list[Envelope]

#: Failure reasons after which the holdout is not judged: the judge cannot (or may not) be asked again.
NO_HOLDOUT_AFTER = {"budget": "the service budget is spent", "judge_unavailable": "the judge is unavailable",
                    CANCELLED_REASON: "the migration was cancelled"}


def progress(state: MigrationState, cause: Envelope, round: int, stage: Stage, detail: str = "",
             **counts: int) -> Envelope:
    """Move ``state`` to ``stage`` and say so (``migration.progress``, one id per stage and detail)."""
    state.stage = stage
    return cause.follow(Subject.MIGRATION_PROGRESS, MigrationProgress(stage=stage, detail=detail, **counts),
                        round=round, key=f"progress-{stage}-{detail}")


def end(state: MigrationState, cause: Envelope, chosen: RoundState | None, outcome: str,
        detail: str = "") -> Outputs:
    """The decision is taken (``outcome``: 'completed' or a failure reason; ``chosen``: the round handed over).
    With a holdout split and a chosen adapter, first have that adapter answer the holdout (``infer.request``,
    once: deterministic id) and judge all of it; the final event follows in :func:`holdout_end`."""
    holdout = state.data.holdout if state.data is not None else None
    if chosen is None or chosen.adapter is None or holdout is None or not holdout.rows:
        return final(state, cause, chosen, outcome, detail)
    if outcome in NO_HOLDOUT_AFTER:
        if chosen.summary is not None:
            chosen.summary.holdout_note = f"holdout not judged: {NO_HOLDOUT_AFTER[outcome]}"
        return final(state, cause, chosen, outcome, detail)
    k = state.parsed_spec.student.inference.samples_per_prompt
    state.holdout = HoldoutState(round=chosen.round, outcome=outcome, detail=detail, to_judge=holdout.rows * k)
    return [
        progress(state, cause, chosen.round, Stage.HOLDOUT, f"round {chosen.round}", judged=0,
                 to_judge=holdout.rows * k),
        cause.follow(Subject.INFER_REQUEST, InferRequest(adapter=chosen.adapter), round=chosen.round, key="holdout"),
    ]


def on_holdout_scored(state: MigrationState, event: Envelope[EvalScored]) -> Outputs:
    """Collect one judged holdout batch (all of them are judged: no early stopping); when all are in, publish
    the final event with the holdout aggregates. Never changes a decision."""
    outputs = collect_batch(state, state.holdout, Stage.HOLDOUT, event)
    return holdout_end(state, event) if outputs is None else outputs


def collect_batch(state: MigrationState, ledger: HoldoutState | BaselineState | None, stage: Stage,
                  event: Envelope[EvalScored]) -> Outputs | None:
    """Add one judged batch of an end-of-migration stage (holdout, baseline: every batch is judged) to its
    ledger. Returns None once every batch is in (the caller ends the stage), else the outputs: a progress event,
    or nothing for a batch that is not this stage's or was already counted (a redelivery)."""
    p = event.payload
    if ledger is None or state.stage != stage or event.round != ledger.round or ledger.has_batch(p.batch):
        return []
    ledger.mark_batch(p.batch)
    ledger.batches = p.batches
    ledger.stats = ledger.stats + GateStats.from_scores(p.scores)
    ledger.usage = ledger.usage + p.usage
    state.usage = state.usage + p.usage
    if ledger.received_count < p.batches:
        return [progress(state, event, ledger.round, stage, detail=f"batch {ledger.received_count}",
                         judged=ledger.stats.answers, to_judge=ledger.to_judge)]
    return None


def holdout_end(state: MigrationState, cause: Envelope, note: str = "") -> Outputs:
    """Put the holdout aggregates (whatever was judged) on the chosen round's summary; publish the final event."""
    h = state.holdout
    assert h is not None
    chosen = state.rounds[h.round]
    if chosen.summary is not None:
        s = chosen.summary
        s.holdout_aggregates = {k: float(v) for k, v in aggregate_stats(h.stats).items()} if h.stats.judged else {}
        s.holdout_judged, s.holdout_to_judge = h.stats.judged, h.to_judge
        notes = [note] if note else []
        if h.stats.failed:
            notes.append(f"the judge failed on {h.stats.failed} of {h.stats.answers} holdout answers")
        s.holdout_note = "; ".join(notes)
    return final(state, cause, chosen, h.outcome, h.detail)


# ------------------------------------------------------------------------------ baseline (only_if_better)


def awaiting_baseline_lookup(state: MigrationState) -> bool:
    """True when the transition just entered the baseline stage: the bus adapter must look up the route's current
    version, copy its adapter, and call :func:`begin_baseline` before the state is saved."""
    return state.stage == Stage.BASELINE and state.baseline is not None and not state.baseline.looked_up


def begin_baseline(state: MigrationState, cause: Envelope, version: str | None, adapter: ArtifactRef | None,
                   note: str = "") -> Outputs:
    """The route's current ``version`` and its ``adapter`` copied under this migration's prefix (both None: the
    route has no current version with an adapter, so the model is promoted without a baseline; only the adapter
    None: ``note`` says why it could not be copied, and the route keeps its version). With both, have it answer
    the eval split (``infer.request`` split ``baseline``, once) and judge all of it."""
    b = state.baseline
    if b is None or b.looked_up or state.stage != Stage.BASELINE:
        return []
    b.looked_up = True
    chosen = state.rounds[b.round]
    if version is None or adapter is None or state.data is None:
        b.version, b.note = version, (note or "the current version has no adapter") if version else ""
        return final(state, cause, chosen, "completed", "")
    k = state.parsed_spec.student.inference.samples_per_prompt
    b.version, b.adapter, b.to_judge = version, adapter, (state.data.test.rows or 0) * k
    return [
        progress(state, cause, b.round, Stage.BASELINE, f"current version {version}", judged=0,
                 to_judge=b.to_judge),
        cause.follow(Subject.INFER_REQUEST, InferRequest(adapter=adapter, split="baseline"), round=b.round,
                     key="baseline"),
    ]


def on_baseline_scored(state: MigrationState, event: Envelope[EvalScored]) -> Outputs:
    """Collect one judged baseline batch (all are judged); when all are in, complete the migration."""
    outputs = collect_batch(state, state.baseline, Stage.BASELINE, event)
    if outputs is not None:
        return outputs
    assert state.baseline is not None
    return final(state, event, state.rounds[state.baseline.round], "completed", "")


def baseline_end(state: MigrationState, cause: Envelope, note: str) -> Outputs:
    """Complete the migration although the baseline was not judged in full (its work dead-lettered): the model
    is kept, the route is not changed (it could not be shown better)."""
    b = state.baseline
    assert b is not None
    b.note = note
    return final(state, cause, state.rounds[b.round], "completed", "")


def _baseline_result(state: MigrationState, b: BaselineState) -> BaselineResult | None:
    if b.version is None:
        return None
    gate = state.parsed_spec.judge.gate
    agg = {k: float(v) for k, v in aggregate_stats(b.stats).items()} if b.stats.judged else {}
    notes = [b.note] if b.note else []
    if b.stats.failed:
        notes.append(f"the judge failed on {b.stats.failed} of {b.stats.answers} baseline answers")
    return BaselineResult(version=b.version, adapter=b.adapter, gate_metric=gate, score=agg.get(gate),
                          aggregates=agg, judged=b.stats.judged, to_judge=b.to_judge, note="; ".join(notes))


def promotion_outcome(state: MigrationState, chosen: RoundState) -> tuple[Promotion, str, BaselineResult | None]:
    """Whether the completed migration's model is promoted on its route, why, and the baseline it was compared
    with: promoted unless ``only_if_better`` and the route's current version scores at least as high (or could
    not be judged in full: better cannot be shown)."""
    spec = state.parsed_spec
    if spec.promotion is None:
        return "none", "the spec has no promotion section", None
    b = state.baseline
    baseline = _baseline_result(state, b) if b is not None else None
    if b is None or baseline is None:
        detail = (f"route {spec.promotion.route} had no current version with an adapter: promoted without a "
                  "baseline" if spec.promotion.only_if_better else "promoted on completion")
        return "promoted", detail, None
    judge = spec.judge
    new = chosen.summary.aggregates.get(judge.gate, 0.0) if chosen.summary else 0.0
    if b.note or baseline.score is None or b.stats.judged < judge.min_judged_fraction * b.to_judge:
        why = b.note or f"{b.stats.judged} of {b.to_judge} answers judged"
        return "kept_current", (f"the current version {b.version} was not judged in full ({why}): the model "
                                "cannot be shown better, the route keeps its version"), baseline
    compared = (f"{judge.gate} {new:.1f} (round {chosen.round}) vs the current version {b.version}'s "
                f"{baseline.score:.1f} on the same eval split")
    if new > baseline.score:
        return "promoted", f"{compared}: better, promoted", baseline
    return "kept_current", f"{compared}: not better, the route keeps its version", baseline


def final(state: MigrationState, cause: Envelope, chosen: RoundState | None, outcome: str,
          detail: str) -> Outputs:
    """``migration.completed`` (``outcome`` 'completed') or ``migration.failed`` with ``chosen`` as the model
    (stage cancelled for the reason ``cancelled``). A completion whose spec sets ``promotion.only_if_better``
    first enters the baseline stage (no output: the bus adapter looks the route up, see the module doc)."""
    summaries = [r.summary for r in state.rounds if r.summary]
    if outcome == "completed" and chosen is not None:
        promotion = state.parsed_spec.promotion
        if promotion is not None and promotion.only_if_better and state.baseline is None:
            state.baseline = BaselineState(round=chosen.round)
            state.stage = Stage.BASELINE
            return []
        state.promotion, state.promotion_detail, baseline = promotion_outcome(state, chosen)
        state.stage, state.outcome = Stage.COMPLETED, "completed"
        return [cause.follow(Subject.MIGRATION_COMPLETED, MigrationCompleted(
            model=chosen.adapter or ArtifactRef(key=""), best_round=chosen.round, rounds=summaries,
            usage=state.usage, report=ArtifactRef(key=migration_key(state.migration_id, "report", "report.html")),
            promotion=state.promotion, promotion_detail=state.promotion_detail, baseline=baseline,
        ), key="completed")]
    state.stage, state.outcome = Stage.CANCELLED if outcome == CANCELLED_REASON else Stage.FAILED, outcome
    return [cause.follow(Subject.MIGRATION_FAILED, MigrationFailed(
        reason=outcome, detail=detail, best_model=chosen.adapter if chosen else None,
        best_round=chosen.round if chosen else None, rounds=summaries, usage=state.usage,
    ), key="failed")]
