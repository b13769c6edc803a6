"""The event contract: one envelope, every payload, every subject.

# size: the whole event contract (subjects, payloads, envelope) stays in one module, the single source of the docs

Services import this module, never raw subject strings. Events are facts (``train.done``), requests are
commands (``train.request``). Every message on the bus is an :class:`Envelope` serialised as JSON; its
``event_id`` is also the ``Nats-Msg-Id`` header, so JetStream drops a re-published duplicate.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamaduo.contracts.gateway import (
    RouteChanged,
    RouteDegraded,
    RouteFallback,
    ShadowRequest,
    ShadowScored,
    TrafficLogged,
)
from llamaduo.contracts.routes import validate_route_name

SCHEMA_VERSION = 1

#: Migration ids end up in S3 keys and subjects: a conservative alphabet keeps both safe.
MIGRATION_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_MIGRATION_ID_RE = re.compile(MIGRATION_ID_PATTERN)


def validate_migration_id(value: str) -> str:
    """Return ``value`` if it is a valid migration id, else raise ``ValueError`` naming the rule."""
    if not _MIGRATION_ID_RE.fullmatch(value):
        raise ValueError(
            f"migration_id {value!r} is invalid: use 1-63 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )
    return value


def new_migration_id() -> str:
    return "m-" + uuid.uuid4().hex[:12]


class Subject(StrEnum):
    """Subject names without the installation prefix (see :func:`subject`)."""

    MIGRATION_START = "migration.start"
    MIGRATION_PROGRESS = "migration.progress"
    MIGRATION_COMPLETED = "migration.completed"
    MIGRATION_FAILED = "migration.failed"
    MIGRATION_CANCEL = "migration.cancel"
    TRAIN_REQUEST = "train.request"
    TRAIN_PROGRESS = "train.progress"
    TRAIN_DONE = "train.done"
    INFER_REQUEST = "infer.request"
    INFER_DONE = "infer.done"
    INFER_SHARD = "infer.shard"
    JUDGE_REQUEST = "judge.request"
    EVAL_SCORED = "eval.scored"
    SYNTH_REQUEST = "synth.request"
    SYNTH_READY = "synth.ready"
    # the gateway's events (payloads in llamaduo.contracts.gateway; envelopes carry ``route``)
    TRAFFIC_LOGGED = "traffic.logged"
    ROUTE_CHANGED = "route.changed"
    ROUTE_FALLBACK = "route.fallback"
    ROUTE_DEGRADED = "route.degraded"
    SHADOW_REQUEST = "shadow.request"
    SHADOW_SCORED = "shadow.scored"


#: The subjects a migration ends on: exactly one of them, once, is its last event.
TERMINAL_SUBJECTS = (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED)

#: Subject families stored in the JetStream stream (plus the dead-letter family).
SUBJECT_FAMILIES = ("migration", "train", "infer", "judge", "eval", "synth", "traffic", "route", "shadow")
DEAD_LETTER_FAMILY = "dlq"


def subject(name: Subject | str, prefix: str = "") -> str:
    """Full subject for ``name`` under an optional installation prefix (``"acme"`` -> ``acme.train.done``)."""
    return f"{prefix}.{name}" if prefix else str(name)


def dead_letter_subject(original: str) -> str:
    """Dead-letter subject of a message first published on ``original`` (which may carry a prefix)."""
    return f"{DEAD_LETTER_FAMILY}.{original}"


class Stage(StrEnum):
    """Where a migration is; the controller's state machine moves through these."""

    PREPARING = "preparing"
    TRAINING = "training"
    INFERENCE = "inference"
    JUDGING = "judging"
    SYNTHESIS = "synthesis"
    HOLDOUT = "holdout"
    BASELINE = "baseline"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The ``migration.failed`` reason of a cancelled migration (``llamaduo cancel``): it ends on ``migration.failed``
#: like every other migration that did not pass, so a client that knows the two terminal subjects never waits
#: forever; the reason tells "cancelled" apart, and ``best_model`` names the best round's adapter, kept.
CANCELLED_REASON = "cancelled"


class ArtifactRef(BaseModel):
    """An object in the artifact store; ``sha256`` lets a reader check what it got."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="Object key inside the installation's bucket")
    sha256: str | None = Field(default=None, description="Hex digest of the object (folder: of its manifest)")
    rows: int | None = Field(default=None, description="Row count, for datasets")


# --------------------------------------------------------------------------------------------- payloads


class MigrationStart(BaseModel):
    """Open a migration. ``spec`` is the migration spec (see :mod:`llamaduo.contracts.spec`), as a mapping."""

    spec: dict[str, Any] = Field(
        description="The migration spec, as validated by llamaduo.contracts.spec.MigrationSpec"
    )


class TrainRequest(BaseModel):
    datasets: list[ArtifactRef] = Field(description="Coverage train split plus every synthetic set so far")
    rows: int = Field(description="Total training rows across datasets")


class TrainProgress(BaseModel):
    step: int
    total_steps: int
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class TrainDone(BaseModel):
    adapter: ArtifactRef = Field(description="Folder holding the trained adapter (or full model)")
    rows: int = Field(description="Training rows used")
    rows_too_long: int = Field(
        default=0, ge=0, description="Training rows left out for being longer than student.training.max_length"
    )
    train_loss: float | None = None
    seconds: float = 0.0
    work: WorkTime | None = Field(default=None, description="The trainer's work on this round (load, train, other)")
    merged: ArtifactRef | None = Field(
        default=None,
        description="Folder holding the LoRA adapter merged into its base model (a standalone model), when the "
        "spec sets student.export_merged",
    )


#: The split a judge batch belongs to: ``eval`` gates rounds; ``holdout`` is judged once at the end; ``baseline``
#: is the eval split answered by the route's current model (``promotion.only_if_better``), judged before promoting.
Split = Literal["eval", "holdout", "baseline"]


class InferRequest(BaseModel):
    """Answer a stored split with an adapter, then hand the answers to the judges (``judge.request`` with
    ``split``). The controller sends it once for the holdout, with the chosen round's adapter, and once for the
    baseline (``promotion.only_if_better``), with its copy of the route's current adapter; the envelope's
    ``round`` is the chosen round."""

    adapter: ArtifactRef = Field(description="The adapter to answer with, under the migration's prefix (verified "
                                 "against its sha256)")
    split: Literal["holdout", "baseline"] = Field(
        default="holdout", description="'holdout': answer the holdout split; 'baseline': answer the eval split "
        "(data/test.jsonl) with the route's current model, to compare before promoting")


class InferDone(BaseModel):
    """A round's size, published before its first answer (the inference worker that split the round into
    ``infer.shard`` requests): the controller then knows the round's total before any score arrives."""

    predictions: ArtifactRef = Field(description="Where the round's joined predictions go (the shards joined by "
                                     "whichever worker stores the last one; no sha256 when published before they "
                                     "exist); never written when the round's judging closes before every shard is "
                                     "answered (early stop): its answered shards stay, and the manifest says so")
    prompts: int = Field(description="Prompts answered in the round (the eval split's rows)")
    samples_per_prompt: int = Field(description="Answers per prompt (K)")
    batches: int = Field(description="Number of judge.request batches published for this round")
    shards: int = Field(default=0, description="Number of infer.shard requests the round was split into (0: "
                        "answered whole by one worker)")


class InferShard(BaseModel):
    """One shard of a round's eval split to answer (a work queue: any inference replica takes it), then hand
    its answers to the judges as ``judge.request`` batches ``first_batch`` .. ``first_batch + shard_batches - 1``
    of the round's ``batches``."""

    adapter: ArtifactRef = Field(description="The round's adapter (train.done), verified against its sha256")
    shard: int = Field(description="Shard index within the round, 0-based (its S3 object: shard-XXXXX.jsonl)")
    shards: int = Field(description="Number of shards in the round")
    prompt_ids: list[str] = Field(description="Ids of the eval-split prompts of this shard, in order")
    first_batch: int = Field(description="Round-wide index of this shard's first judge batch")
    shard_batches: int = Field(description="Number of judge batches this shard makes")
    batches: int = Field(description="Number of judge batches in the whole round")


class WorkTime(BaseModel):
    """Seconds a service worked on what an event reports, by stage, just before publishing it (the work ended
    at the envelope's ``occurred_at``). The stage split of a migration (:mod:`llamaduo.reporting.timeline`) is
    read from these: wall time covered by no event's work is time spent on the bus or idle."""

    load: float = Field(default=0.0, ge=0, description="Loading a model (and what it needs) into the process")
    train: float = Field(default=0.0, ge=0, description="Training steps and saving the student")
    generate: float = Field(default=0.0, ge=0, description="Generating the student's answers")
    judge: float = Field(default=0.0, ge=0, description="Judging answers (service LLM calls or checks)")
    synthesize: float = Field(default=0.0, ge=0, description="Teacher calls and filtering of synthetic rows")
    other: float = Field(default=0.0, ge=0, description="The rest of the handler: artifact store reads and "
                         "writes, bookkeeping")

    @property
    def total(self) -> float:
        return self.load + self.train + self.generate + self.judge + self.synthesize + self.other


class JudgeItem(BaseModel):
    item_id: str = Field(description="Test item id")
    sample: int = Field(default=0, description="Which of the K samples for this prompt")
    instruction: str
    reference: str
    candidate: str


class JudgeRequest(BaseModel):
    batch: int = Field(description="Batch index within the round, 0-based")
    batches: int = Field(description="Number of batches in the round")
    items: list[JudgeItem]
    split: Split = Field(
        default="eval", description="'holdout' or 'baseline': judged in full (never skipped by a closed round), "
        "scores stored apart (round-N/<split>/scores/); a holdout never decides anything, a baseline only whether "
        "the model is promoted")
    work: WorkTime | None = Field(
        default=None, description="The inference worker's work on the answers of this batch's shard (model load "
        "included when it was loaded for them); on the first batch of each shard only, so the sums over a round "
        "are the round's")


class Score(BaseModel):
    item_id: str
    sample: int = 0
    similarity: float | None = Field(default=None, description="1-100, None when judging failed")
    precision: float | None = Field(default=None, description="1-100, None when judging failed")
    reason: str = ""
    failed: bool = False


class Usage(BaseModel):
    """Service-LLM usage of one piece of work."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cached: int = 0
    simulated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost=self.cost + other.cost,
            cached=self.cached + other.cached,
            simulated=self.simulated or other.simulated,
        )

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class EvalScored(BaseModel):
    batch: int
    batches: int
    scores: list[Score]
    usage: Usage = Field(default_factory=Usage)
    provider: str = ""
    budget_exhausted: bool = Field(
        default=False, description="Some answers were not judged: a call would have exceeded the budget"
    )
    scores_ref: ArtifactRef | None = Field(
        default=None, description="The batch's scores as stored in S3 (round-N/scores/batch-XXXXX.jsonl)"
    )
    split: Split = Field(default="eval", description="The judge.request's split, echoed")
    work: WorkTime | None = Field(default=None, description="The judge's work on this batch")


class SynthRequest(BaseModel):
    samples: int = Field(description="How many new examples to aim for")
    exclude_seed_ids: list[str] = Field(default_factory=list, description="Seeds used by earlier rounds")
    scores_round: int | None = Field(
        default=None,
        description="Round whose judged batches (S3 objects round-N/scores/batch-XXXXX.jsonl) name the test items "
        "that fell short of the gate, for the targeted strategy; the synthesizer reads them (the event stays small)",
    )
    failed_item_ids: list[str] = Field(
        default_factory=list,
        description="Test items the student failed; the controller leaves it empty (see scores_round), the "
        "synthesizer fills it from the score objects before synthesizing",
    )


class SynthReady(BaseModel):
    dataset: ArtifactRef
    generated: int
    kept: int
    removed: dict[str, int] = Field(default_factory=dict, description="Removed examples by reason")
    seed_ids: list[str] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    provider: str = ""
    budget_exhausted: bool = Field(
        default=False, description="Calls were not made because they would have exceeded the budget"
    )
    work: WorkTime | None = Field(default=None, description="The synthesizer's work on this round")


class RoundSummary(BaseModel):
    round: int
    train_rows: int = 0
    synthetic_rows: int = 0
    adapter: ArtifactRef | None = None
    train_loss: float | None = None
    aggregates: dict[str, float] = Field(default_factory=dict)
    judged: int = 0
    failed_judgements: int = 0
    to_judge: int = Field(default=0, description="Answers the round produced for judging (prompts x K)")
    gate_metric: str = ""
    threshold: float = 0.0
    decision: Literal["pass", "continue", "stop"] | None = None
    early_stopped: bool = Field(
        default=False, description="Judging closed before every answer was judged (sequential early stopping)"
    )
    gate_interval: tuple[float, float] | None = Field(
        default=None, description="Confidence interval [low, high] of the gate over the whole round, if early"
    )
    confidence: float | None = Field(default=None, description="Confidence of gate_interval")
    usage: Usage = Field(default_factory=Usage)
    rows_too_long: int = Field(
        default=0, description="Training rows left out: longer than student.training.max_length (train.done)"
    )
    synthesis_removed: dict[str, int] = Field(
        default_factory=dict, description="Synthetic rows removed for this round's training data, by reason"
    )
    holdout_aggregates: dict[str, float] = Field(
        default_factory=dict, description="Aggregates over the holdout split, judged once at the end with this "
        "(the chosen) round's adapter; empty for other rounds or without a holdout. Never used for a decision")
    holdout_judged: int = Field(default=0, description="Holdout answers judged (holdout_aggregates are over these)")
    holdout_to_judge: int = Field(default=0, description="Holdout answers produced for judging")
    holdout_note: str = Field(default="", description="Why the holdout score is missing or partial, if it is")


class MigrationProgress(BaseModel):
    stage: Stage
    detail: str = ""
    judged: int | None = None
    to_judge: int | None = None


#: What became of a completed migration's model on its gateway route: ``promoted`` (the spec's ``promotion``
#: applied), ``kept_current`` (``only_if_better`` and it did not beat the current version), ``none`` (no promotion).
Promotion = Literal["promoted", "kept_current", "none"]


class BaselineResult(BaseModel):
    """The route's current version judged on this migration's eval split (``promotion.only_if_better``)."""

    version: str = Field(description="The route's current version (the migration id that produced it)")
    adapter: ArtifactRef | None = Field(
        default=None, description="Its adapter as copied under this migration's prefix (what answered); None: it "
        "could not be copied (see note)")
    gate_metric: str = Field(default="", description="The gate aggregate compared (judge.gate)")
    score: float | None = Field(default=None, description="Its gate value on the eval split; None: nothing judged")
    aggregates: dict[str, float] = Field(default_factory=dict, description="Every aggregate of its answers")
    judged: int = Field(default=0, description="Answers judged (the aggregates are over these)")
    to_judge: int = Field(default=0, description="Answers produced for judging (eval prompts x K)")
    note: str = Field(default="", description="Why the baseline is missing or partial, if it is")


class MigrationCompleted(BaseModel):
    model: ArtifactRef = Field(description="The chosen adapter")
    best_round: int
    rounds: list[RoundSummary]
    report: ArtifactRef | None = None
    usage: Usage = Field(default_factory=Usage)
    promotion: Promotion = Field(
        default="none", description="promoted: the spec's promotion is applied (route.changed follows); "
        "kept_current: promotion.only_if_better and the model did not beat the route's current version on the "
        "same eval split (the route is unchanged, the model is kept); none: the spec has no promotion")
    promotion_detail: str = Field(default="", description="Why, with both gate values when they were compared")
    baseline: BaselineResult | None = Field(
        default=None, description="The route's current version judged on the eval split (only_if_better with a "
        "current version that has an adapter); None otherwise")


class MigrationCancel(BaseModel):
    """Cancel a migration (``llamaduo cancel``): in-flight work stops at its next safe point and the migration
    ends with ``migration.failed`` reason ``cancelled``, keeping its best round's adapter. Publishing it twice is
    harmless (same event id per migration by default, and the controller applies it once)."""

    reason: str = Field(default="", description="Why, in the requester's words (shown in the terminal event)")
    requested_by: str = Field(default="", description="Who asked (user@host for the CLI)")


class MigrationFailed(BaseModel):
    reason: str = Field(
        description="Machine-readable reason: spec, dataset, budget, max_rounds, plateau, judge_unavailable, "
        "synthesis_exhausted, dead_letter, cancelled (by a migration.cancel; best_model is the best round's "
        "adapter, kept)"
    )
    detail: str = ""
    best_model: ArtifactRef | None = None
    best_round: int | None = None
    rounds: list[RoundSummary] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)


class DeadLetter(BaseModel):
    """What a consumer could not process, with the reason; published on ``dlq.<original subject>``."""

    subject: str
    reason: str
    deliveries: int
    service: str
    body: str = Field(description="The original message body (utf-8, replaced where not decodable)")
    migration_id: str | None = None


PAYLOADS: dict[Subject, type[BaseModel]] = {
    Subject.MIGRATION_START: MigrationStart,
    Subject.MIGRATION_PROGRESS: MigrationProgress,
    Subject.MIGRATION_COMPLETED: MigrationCompleted,
    Subject.MIGRATION_FAILED: MigrationFailed,
    Subject.MIGRATION_CANCEL: MigrationCancel,
    Subject.TRAIN_REQUEST: TrainRequest,
    Subject.TRAIN_PROGRESS: TrainProgress,
    Subject.TRAIN_DONE: TrainDone,
    Subject.INFER_REQUEST: InferRequest,
    Subject.INFER_DONE: InferDone,
    Subject.INFER_SHARD: InferShard,
    Subject.JUDGE_REQUEST: JudgeRequest,
    Subject.EVAL_SCORED: EvalScored,
    Subject.SYNTH_REQUEST: SynthRequest,
    Subject.SYNTH_READY: SynthReady,
    Subject.TRAFFIC_LOGGED: TrafficLogged,
    Subject.ROUTE_CHANGED: RouteChanged,
    Subject.ROUTE_FALLBACK: RouteFallback,
    Subject.ROUTE_DEGRADED: RouteDegraded,
    Subject.SHADOW_REQUEST: ShadowRequest,
    Subject.SHADOW_SCORED: ShadowScored,
}

# --------------------------------------------------------------------------------------------- envelope

P = TypeVar("P")


class Envelope(BaseModel, Generic[P]):
    """The one envelope every message carries: a migration's (``migration_id``) or a gateway route's
    (``route``, plus ``migration_id`` when it concerns one, e.g. a promotion). At least one of the two is set."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(description="Idempotency key; also the Nats-Msg-Id header")
    migration_id: str | None = Field(default=None, description="The migration it belongs to, if any")
    route: str | None = Field(default=None, description="The gateway route it belongs to, if any")
    round: int = Field(default=0, ge=0)
    type: Subject = Field(description="The subject name without prefix")
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    correlation_id: str = Field(
        description="The migration's first event id (the same for every event of it); a route event's: the route")
    causation_id: str | None = Field(default=None, description="event_id of the message that caused this one")
    payload: P

    @field_validator("migration_id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_migration_id(value)

    @field_validator("route")
    @classmethod
    def _check_route(cls, value: str | None) -> str | None:
        return None if value is None else validate_route_name(value)

    @model_validator(mode="after")
    def _belongs_somewhere(self) -> Envelope[P]:
        if self.migration_id is None and self.route is None:
            raise ValueError("an envelope needs a migration_id (migration events) or a route (gateway events)")
        return self

    def require_migration_id(self) -> str:
        """The migration id, for handlers of migration events; raises ``ValueError`` naming the event when a
        route event without one reached a migration handler (a wiring mistake, not a user's)."""
        if self.migration_id is None:
            raise ValueError(f"{self.type} event {self.event_id} (route {self.route!r}) has no migration_id, "
                             "but its handler needs one: only migration events belong there")
        return self.migration_id

    @field_validator("schema_version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is newer than this service understands ({SCHEMA_VERSION})")
        return value

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def follow(self, type_: Subject, payload: BaseModel, *, round: int | None = None, key: str = "") -> Envelope:
        """An envelope caused by this one. ``key`` makes the event id deterministic, so that a handler
        re-run after a redelivery publishes the same id and JetStream drops the copy."""
        r = self.round if round is None else round
        return Envelope(
            event_id=deterministic_id(self.event_id, type_, r, key) if key else uuid.uuid4().hex,
            migration_id=self.migration_id,
            route=self.route,
            round=r,
            type=type_,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            payload=payload,
        )


def deterministic_id(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


def start_envelope(migration_id: str, spec: dict[str, Any], event_id: str | None = None) -> Envelope:
    """The ``migration.start`` envelope for ``spec``. Same migration id -> same event id by default,
    so publishing it twice starts one migration."""
    eid = event_id or deterministic_id("start", migration_id)
    return Envelope(
        event_id=eid,
        migration_id=migration_id,
        round=0,
        type=Subject.MIGRATION_START,
        correlation_id=eid,
        payload=MigrationStart(spec=spec),
    )


def cancel_envelope(migration_id: str, correlation_id: str, reason: str = "", requested_by: str = "") -> Envelope:
    """The ``migration.cancel`` envelope of a migration. One event id per migration: a second cancel within
    JetStream's duplicate window is dropped by the server, and the controller applies it once anyway."""
    eid = deterministic_id("cancel", migration_id)
    return Envelope(
        event_id=eid, migration_id=migration_id, round=0, type=Subject.MIGRATION_CANCEL,
        correlation_id=correlation_id, causation_id=None,
        payload=MigrationCancel(reason=reason, requested_by=requested_by),
    )


def route_envelope(type_: Subject, payload: BaseModel, route: str, *, migration_id: str | None = None,
                   key: str = "") -> Envelope:
    """A gateway event of ``route`` (its correlation id: the route name). ``key`` makes the event id
    deterministic (e.g. the request id of ``traffic.logged``), so a re-publish is dropped by JetStream."""
    return Envelope(
        event_id=deterministic_id("route", route, type_, key) if key else uuid.uuid4().hex,
        migration_id=migration_id,
        route=route,
        round=0,
        type=type_,
        correlation_id=route,
        payload=payload,
    )


def outcome_of(final: Envelope) -> str:
    """'completed', 'cancelled' or 'failed': the outcome a terminal event announces."""
    if final.type == Subject.MIGRATION_COMPLETED:
        return "completed"
    return "cancelled" if getattr(final.payload, "reason", "") == CANCELLED_REASON else "failed"


# Typed envelopes, one per subject: handlers annotate with these and the bus validates before they run.
MigrationStartEvent = Envelope[MigrationStart]
TrainRequestEvent = Envelope[TrainRequest]
TrainProgressEvent = Envelope[TrainProgress]
TrainDoneEvent = Envelope[TrainDone]
InferRequestEvent = Envelope[InferRequest]
InferDoneEvent = Envelope[InferDone]
InferShardEvent = Envelope[InferShard]
JudgeRequestEvent = Envelope[JudgeRequest]
EvalScoredEvent = Envelope[EvalScored]
SynthRequestEvent = Envelope[SynthRequest]
SynthReadyEvent = Envelope[SynthReady]
MigrationProgressEvent = Envelope[MigrationProgress]
MigrationCompletedEvent = Envelope[MigrationCompleted]
MigrationFailedEvent = Envelope[MigrationFailed]
MigrationCancelEvent = Envelope[MigrationCancel]
TrafficLoggedEvent = Envelope[TrafficLogged]
RouteChangedEvent = Envelope[RouteChanged]
RouteFallbackEvent = Envelope[RouteFallback]
RouteDegradedEvent = Envelope[RouteDegraded]
ShadowRequestEvent = Envelope[ShadowRequest]
ShadowScoredEvent = Envelope[ShadowScored]


def parse_event(data: bytes | str | dict[str, Any]) -> Envelope:
    """Parse any message into an envelope with its typed payload (by ``type``)."""
    raw = Envelope[dict[str, Any]].model_validate_json(data) if not isinstance(data, dict) else None
    if raw is None:
        raw = Envelope[dict[str, Any]].model_validate(data)
    model = PAYLOADS[Subject(raw.type)]
    return Envelope[model].model_validate(raw.model_dump() | {"payload": raw.payload})  # type: ignore[valid-type]
