"""The migration state: what the controller keeps per migration in the JetStream KV bucket.

The controller is its only writer; clients (``llamaduo status``) and the manifest read it. It is stored as
JSON, so a field added here needs a default for states written before it.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from llamaduo.contracts.events import ArtifactRef, RoundSummary, Score, Stage, Usage
from llamaduo.contracts.spec import MigrationSpec


class RoundState(BaseModel):
    """One round: what it trained on, what it produced, how it was judged."""

    round: int
    datasets: list[ArtifactRef]
    train_rows: int
    synthetic_rows: int = 0
    adapter: ArtifactRef | None = None
    merged: ArtifactRef | None = Field(default=None, description="Adapter merged into its base (export_merged)")
    train_loss: float | None = None
    predictions: ArtifactRef | None = None
    batches: int | None = None
    scores: dict[int, list[Score]] = Field(default_factory=dict, description="Scores by judge batch")
    to_judge: int | None = Field(default=None, description="Answers to judge (from infer.done)")
    judge_provider: str = ""
    usage: Usage = Field(default_factory=Usage)
    summary: RoundSummary | None = None
    judging_closed: bool = Field(
        default=False, description="Closed with batches outstanding: judges skip the rest (marker object)"
    )
    late_batches: list[int] = Field(
        default_factory=list, description="Batches scored after the round closed: usage counted, scores not"
    )
    budget_exhausted: bool = False

    @property
    def batches_outstanding(self) -> bool:
        """True while judge batches are unknown or not all scored."""
        return self.batches is None or len(self.scores) < self.batches


class DataRefs(BaseModel):
    """The stored splits of a migration's coverage dataset."""

    train: ArtifactRef
    coverage: ArtifactRef
    test: ArtifactRef


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
    applied: list[str] = Field(default_factory=list, description="Event ids already applied")
    outcome: str | None = None

    @property
    def done(self) -> bool:
        """True once the migration completed or failed."""
        return self.stage in (Stage.COMPLETED, Stage.FAILED)

    @property
    def parsed_spec(self) -> MigrationSpec:
        """The spec as a validated :class:`MigrationSpec`."""
        return MigrationSpec.model_validate(self.spec)

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
