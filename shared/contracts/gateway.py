"""Payloads of the gateway's events (subject families ``traffic``, ``route`` and ``shadow``).

Registered in :data:`llamaduo.contracts.events.PAYLOADS` like every other payload; this module imports nothing
from ``events`` (no cycle). A gateway event's envelope carries ``route`` (and ``migration_id`` when it concerns
one, e.g. a promotion); build it with :func:`llamaduo.contracts.events.route_envelope`.

What these events never carry: request headers, API keys, client addresses.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from llamaduo.contracts.routes import RouteMode, RouteState, validate_route_name
from llamaduo.contracts.spec import ProviderSpec

#: Why a request meant for the local model was answered by the upstream instead.
FallbackReason = Literal["error", "timeout", "overloaded", "invalid", "unavailable"]


class ChatMessage(BaseModel):
    """One chat turn as the client sent it."""

    role: str = Field(description="system, user or assistant")
    content: str = Field(description="The turn's text")


class _RoutePayload(BaseModel):
    route: str = Field(description="The route (the task alias clients pass as 'model')")

    @field_validator("route")
    @classmethod
    def _route_name(cls, value: str) -> str:
        return validate_route_name(value)


class TrafficLogged(_RoutePayload):
    """One answered request, as captured (after redaction). ``stored_key`` is the JSONL batch it went to."""

    request_id: str = Field(description="The gateway's id of the request")
    at: datetime = Field(description="When the request arrived")
    messages: list[ChatMessage] = Field(description="The request's chat, redacted")
    response: str = Field(description="The answer returned to the client, redacted")
    answered_by: Literal["local", "upstream"] = Field(description="Who answered")
    local_version: str | None = Field(default=None, description="The promoted version that answered, if local")
    latency_ms: float = Field(ge=0, description="Time to the answer, milliseconds")
    prompt_tokens: int = Field(default=0, ge=0, description="Prompt tokens of the answering model")
    completion_tokens: int = Field(default=0, ge=0, description="Completion tokens of the answering model")
    fallback_reason: str | None = Field(
        default=None, description="Why the upstream answered a request routed locally (see route.fallback)")
    stored_key: str | None = Field(
        default=None, description="S3 key of the JSONL batch holding it (traffic/<route>/...); None: capture off")


class RouteChanged(_RoutePayload):
    """A route's state changed (promotion, rollback, policy or degradation); the KV entry is the truth, this
    event is for observers."""

    mode: RouteMode = Field(description="off, shadow, canary or full")
    percent: float = Field(ge=0, le=100, description="Canary share answered locally, in percent")
    version: str | None = Field(description="The version now promoted (a migration id); None: none (off)")
    local_model: str | None = Field(default=None, description="Name the local server serves the version under")
    adapter_key: str | None = Field(default=None, description="S3 key of the version's adapter, if known")
    previous: RouteState | None = Field(default=None, description="The route's state before, if it had one")
    reason: Literal["promote", "rollback", "policy", "degraded"] = Field(description="Why it changed")
    actor: str = Field(default="", description="Who changed it (service name, or user@host for the CLI)")


class RouteFallback(_RoutePayload):
    """A request routed to the local model was answered by the upstream."""

    request_id: str = Field(description="The gateway's id of the request")
    version: str | None = Field(description="The local version that failed")
    reason: FallbackReason = Field(description="error, timeout, overloaded, invalid (validator refused) or "
                                               "unavailable")
    detail: str = Field(default="", max_length=500, description="Short text, no secrets")
    latency_ms: float = Field(default=0.0, ge=0, description="Time spent on the local attempt, milliseconds")


class ShadowRequest(_RoutePayload):
    """Compare a local answer with the upstream's (the reference); handled by the judge service."""

    request_id: str = Field(description="The gateway's id of the request")
    version: str = Field(description="The local version that answered in the shadow")
    instruction: str = Field(description="The user's last message")
    messages: list[ChatMessage] = Field(description="The request's chat, redacted")
    reference: str = Field(description="The upstream's answer")
    candidate: str = Field(description="The local model's answer")
    system_prompt: str = Field(default="", description="The route's system prompt (the task the answers serve)")
    judge: ProviderSpec | None = Field(
        default=None, description="The service LLM that judges (the route's shadow.judge, else its upstream); "
        "names the environment variable of its key (api_key_env), never a key. None: it cannot be judged")


class ShadowScored(_RoutePayload):
    """The judge's scores of one shadow comparison (same rubric as a migration's eval)."""

    request_id: str = Field(description="The shadow request's id")
    version: str = Field(description="The local version judged")
    similarity: float | None = Field(default=None, ge=1, le=100, description="1-100, None when judging failed")
    precision: float | None = Field(default=None, ge=1, le=100, description="1-100, None when judging failed")
    failed: bool = Field(default=False, description="Judging failed (see reason)")
    reason: str = Field(default="", description="The judge's reason, or why judging failed")


class RouteDegraded(_RoutePayload):
    """The rolling shadow score of a promoted version fell below the route's threshold."""

    version: str = Field(description="The version that degraded")
    window: int = Field(ge=1, description="Answers in the rolling window")
    rolling_score: float = Field(description="Mean score over the window")
    threshold: float = Field(description="The route's shadow threshold")
    remigration_id: str | None = Field(default=None, description="The migration started to replace it, if any")
