"""The migration state: what the controller keeps per migration in the JetStream KV bucket.

The controller is its only writer; clients (``llamaduo status``) and the manifest read it. It is stored as
JSON, so a field added here needs a default for states written before it.

**Size.** The value must not grow with the number of judged answers (NATS refuses values over 1 MiB by
default). Per-answer scores live in S3, one object per judged batch (``round-N/scores/batch-XXXXX.jsonl``,
written by the judge); a round keeps only :class:`GateStats` (sums and counts: the sufficient statistics of
every gate aggregate and of the sequential test), a bitmap of the batches already applied (1 bit per judge
batch, hex), and the statistics of at most :data:`PENDING_KEEP` batches that arrived ahead of the published
order (the controller re-reads the others from S3 when the in-order prefix reaches them). ``applied`` keeps
only the last :data:`APPLIED_KEEP` event ids: every handler is also idempotent on its own (a batch is applied
once by the bitmap; train/infer/synth results once per round).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from llamaduo.contracts.events import ArtifactRef, Envelope, Promotion, RoundSummary, Score, Stage, Usage
from llamaduo.contracts.spec import MigrationSpec

#: How many recent event ids :attr:`MigrationState.applied` keeps (a fast path; handlers are idempotent).
APPLIED_KEEP = 64
#: Most out-of-order batches whose statistics a round keeps (:attr:`RoundState.pending`); the controller re-reads
#: the others' scores from their S3 object when the in-order prefix reaches them.
PENDING_KEEP = 8


class GateStats(BaseModel):
    """Sums and counts over a set of answers, enough for every gate aggregate and the sequential test.

    ``judged`` answers have both scores; ``failed`` ones (judging failed) have none and count nowhere else.
    """

    judged: int = 0
    failed: int = 0
    similarity_sum: float = 0.0
    precision_sum: float = 0.0
    similarity_ge50: int = 0
    similarity_ge70: int = 0
    precision_ge50: int = 0
    precision_ge70: int = 0

    @classmethod
    def from_scores(cls, scores: list[Score]) -> GateStats:
        """Statistics of one batch of scores (one :class:`Score` per answer)."""
        stats = cls()
        for s in scores:
            if s.failed or s.similarity is None or s.precision is None:
                stats.failed += 1
                continue
            sim, prec = float(s.similarity), float(s.precision)
            stats.judged += 1
            stats.similarity_sum += sim
            stats.precision_sum += prec
            stats.similarity_ge50 += sim >= 50
            stats.similarity_ge70 += sim >= 70
            stats.precision_ge50 += prec >= 50
            stats.precision_ge70 += prec >= 70
        return stats

    def __add__(self, other: GateStats) -> GateStats:
        return GateStats(**{name: getattr(self, name) + getattr(other, name) for name in GateStats.model_fields})

    @property
    def answers(self) -> int:
        """Answers counted, judged or not."""
        return self.judged + self.failed


def _bit(bitmap: str, index: int) -> bool:
    byte = index // 8
    return byte * 2 < len(bitmap) and bool(int(bitmap[byte * 2:byte * 2 + 2], 16) & (1 << (index % 8)))


def _set_bit(bitmap: str, index: int) -> str:
    byte = index // 8
    if len(bitmap) < (byte + 1) * 2:
        bitmap = bitmap + "00" * (byte + 1 - len(bitmap) // 2)
    value = int(bitmap[byte * 2:byte * 2 + 2], 16) | (1 << (index % 8))
    return f"{bitmap[:byte * 2]}{value:02x}{bitmap[byte * 2 + 2:]}"


class BatchLedger(BaseModel):
    """Which judge batches were applied: a bitmap (hex, bit b = batch b), so the size is one bit a batch."""

    received: str = Field(default="", description="Bitmap (hex, bit b = batch b) of the eval.scored applied")
    received_count: int = Field(default=0, description="Number of batches set in ``received``")

    def has_batch(self, batch: int) -> bool:
        """True when batch ``batch``'s eval.scored was applied."""
        return _bit(self.received, batch)

    def mark_batch(self, batch: int) -> None:
        """Record batch ``batch`` as applied (once)."""
        if not self.has_batch(batch):
            self.received = _set_bit(self.received, batch)
            self.received_count += 1


class RoundState(BatchLedger):
    """One round: what it trained on, what it produced, how it was judged (statistics, not scores)."""

    round: int
    datasets: list[ArtifactRef]
    train_rows: int
    synthetic_rows: int = 0
    adapter: ArtifactRef | None = None
    merged: ArtifactRef | None = Field(default=None, description="Adapter merged into its base (export_merged)")
    train_loss: float | None = None
    predictions: ArtifactRef | None = None
    batches: int | None = None
    totals: GateStats = Field(default_factory=GateStats, description="Over every batch applied while open")
    prefix_batches: int = Field(default=0, description="Batches 0..prefix_batches-1 (published order) all in")
    prefix: GateStats = Field(default_factory=GateStats, description="Over the in-order prefix of batches")
    pending: dict[int, GateStats] = Field(
        default_factory=dict,
        description=f"Statistics of up to {PENDING_KEEP} batches in beyond the prefix (the others are re-read from "
        "S3 when the prefix reaches them)",
    )
    to_judge: int | None = Field(default=None, description="Answers to judge (from infer.done)")
    judge_provider: str = ""
    rows_too_long: int = Field(default=0, description="Training rows left out as too long (train.done)")
    synthesis_removed: dict[str, int] = Field(
        default_factory=dict, description="Synthetic rows removed by reason (synth.ready of this round)"
    )
    usage: Usage = Field(default_factory=Usage)
    summary: RoundSummary | None = None
    judging_closed: bool = Field(
        default=False, description="Closed with batches outstanding: judges skip the rest (marker object)"
    )
    late_count: int = Field(default=0, description="Batches scored after the round closed: usage counted")
    budget_exhausted: bool = False

    @property
    def batches_outstanding(self) -> bool:
        """True while judge batches are unknown or not all scored."""
        return self.batches is None or self.received_count < self.batches


class DataRefs(BaseModel):
    """The stored splits of a migration's coverage dataset."""

    train: ArtifactRef
    coverage: ArtifactRef
    test: ArtifactRef = Field(description="The eval split (gates every round), stored as data/test.jsonl")
    holdout: ArtifactRef | None = Field(
        default=None, description="The holdout split (judged once at the end); None: the migration has none")


class HoldoutState(BatchLedger):
    """The end of a migration: the chosen round's adapter answers the holdout split, the judge scores all of it
    (no early stopping), then the final event (kept here as ``outcome``/``detail``) is published with the
    holdout aggregates beside the gate score. Bounded like a round: a bitmap and sums, no scores."""

    round: int = Field(description="The chosen round, whose adapter answers the holdout")
    outcome: str = Field(description="'completed', or the failure reason of the migration.failed to publish")
    detail: str = ""
    to_judge: int = Field(default=0, description="Holdout answers expected (prompts x K)")
    batches: int | None = None
    stats: GateStats = Field(default_factory=GateStats)
    usage: Usage = Field(default_factory=Usage)


class BaselineState(BatchLedger):
    """Before promoting with ``promotion.only_if_better``: the route's current version (its adapter copied under
    this migration's prefix) answers the eval split and the judge scores all of it; the migration then completes,
    promoted only when the chosen round's gate value is strictly greater. Bounded like a round: a bitmap and sums.

    Entered (stage baseline) with ``looked_up`` False; the bus adapter then reads the route's current version and
    copies its adapter within the same transition (:func:`~llamaduo.services.controller.domain.begin_baseline`)."""

    round: int = Field(description="The chosen round, whose gate value the baseline must not reach")
    looked_up: bool = Field(default=False, description="The route's current version was looked up")
    version: str | None = Field(default=None, description="The route's current version; None: nothing to beat")
    adapter: ArtifactRef | None = Field(default=None, description="Its adapter, copied under this migration")
    to_judge: int = Field(default=0, description="Baseline answers expected (eval prompts x K)")
    batches: int | None = None
    stats: GateStats = Field(default_factory=GateStats)
    usage: Usage = Field(default_factory=Usage)
    note: str = Field(default="", description="Why the baseline was not judged in full, if it was not")


class MigrationState(BaseModel):
    """Everything the controller knows about one migration."""

    migration_id: str
    correlation_id: str
    stage: Stage = Stage.PREPARING
    spec: dict
    data: DataRefs | None = None
    rounds: list[RoundState] = Field(default_factory=list)
    used_seed_ids: list[str] = Field(default_factory=list)
    synthetic: list[ArtifactRef] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    applied: list[str] = Field(
        default_factory=list, description=f"The last {APPLIED_KEEP} event ids applied (handlers are idempotent)"
    )
    outbox: list[Envelope[dict[str, Any]]] = Field(
        default_factory=list,
        description="Outputs of the last transition, saved before they are published and cleared after: a "
        "crash in between re-publishes them (same event ids, so JetStream drops copies)",
    )
    outcome: str | None = None
    holdout: HoldoutState | None = Field(
        default=None, description="Set when the migration ended and its holdout is being judged (stage holdout)")
    baseline: BaselineState | None = Field(
        default=None, description="Set when the migration passed with promotion.only_if_better (stage baseline)")
    promotion: Promotion | None = Field(
        default=None, description="What became of the model on its route once completed (see MigrationCompleted)")
    promotion_detail: str = Field(default="", description="Why (both gate values when they were compared)")

    @property
    def done(self) -> bool:
        """True once the migration completed, failed or was cancelled."""
        return self.stage in (Stage.COMPLETED, Stage.FAILED, Stage.CANCELLED)

    @property
    def ending(self) -> bool:
        """True while the decision is taken and only the holdout or baseline judgement is left (no more rounds)."""
        return self.stage in (Stage.HOLDOUT, Stage.BASELINE)

    @property
    def parsed_spec(self) -> MigrationSpec:
        """The spec as a validated :class:`MigrationSpec`."""
        return MigrationSpec.model_validate(self.spec)

    def mark_applied(self, event_id: str) -> None:
        """Remember ``event_id`` as applied, keeping the last :data:`APPLIED_KEEP`."""
        if event_id not in self.applied:
            self.applied = [*self.applied, event_id][-APPLIED_KEEP:]

    def current(self, round: int) -> RoundState | None:
        """Round ``round``, or None if there is no such round."""
        return self.rounds[round] if 0 <= round < len(self.rounds) else None

    def best_round(self) -> RoundState | None:
        """The round whose adapter the migration hands over: highest gated score, earliest on a tie.

        Rounds without a summary or an adapter do not count; None when no round qualifies.
        """
        scored = [r for r in self.rounds if r.summary and r.adapter]
        if not scored:
            return None
        gate = self.parsed_spec.judge.gate
        return max(scored, key=lambda r: (r.summary.aggregates.get(gate, 0.0), -r.round))  # type: ignore[union-attr]
