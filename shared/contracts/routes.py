"""Route state: which model answers a gateway route (a task alias clients pass as ``model``).

One :class:`RouteState` per route lives in the NATS KV bucket ``<stream>_ROUTES`` (key: the route name, see
:func:`llamaduo.bus.topology.routes_bucket`); every gateway replica watches the bucket, so a promotion or a
rollback applies without a restart. The functions here are pure: :func:`promote` and :func:`rollback` return
the next state (the caller writes it with a compare-and-set), :func:`assign` decides who answers one request.

Modes: ``off`` (the upstream service LLM answers everything), ``shadow`` (the upstream answers, the local model
answers a sample in the background to be compared), ``canary`` (``percent`` % of users are answered locally,
sticky per user or conversation), ``full`` (the local model answers everything; the upstream is the fallback).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Route names end up in S3 keys (``traffic/<route>/...``) and KV keys: letters, digits, '.', '_', '-',
#: starting and ending with a letter or digit, no '..' (so a name can never leave its prefix).
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"
_ROUTE_NAME_RE = re.compile(ROUTE_NAME_PATTERN)

#: Earlier states kept for rollback (older ones drop off): the KV value stays a few kilobytes at most.
HISTORY_LIMIT = 10

#: A sha256 hex digest (the adapter folder index's).
SHA256_PATTERN = r"^[0-9a-f]{64}$"

RouteMode = Literal["off", "shadow", "canary", "full"]
Side = Literal["local", "upstream"]

#: Resolution of the canary split: a user's bucket is one of this many.
_BUCKETS = 10_000


def validate_route_name(value: str) -> str:
    """Return ``value`` if it is a valid route name, else raise ``ValueError`` naming the rule."""
    if not isinstance(value, str) or not _ROUTE_NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"route name {value!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting and ending with "
            "a letter or digit, without '..' (e.g. 'invoice-extraction')"
        )
    return value


def _now() -> datetime:
    return datetime.now(UTC)


class RouteVersion(BaseModel):
    """An earlier state of a route (who answered, and how), kept in :attr:`RouteState.history` for rollback.

    Every change that :func:`promote` makes pushes the state before it, so a rollback undoes exactly the last
    change: canary -> full of one version rolls back to that canary at its share."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(max_length=128, description="The version then served (the migration id that produced it)")
    mode: RouteMode = Field(description="The mode it was served in")
    percent: float = Field(ge=0, le=100, description="Canary share answered locally, in percent")
    local_model: str | None = Field(default=None, max_length=256, description="Name the local server serves it under")
    adapter_key: str | None = Field(default=None, max_length=1024, description="S3 key of its adapter, if known")
    adapter_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="sha256 of its adapter folder's index (_index.json), if known: the download is checked against it")
    promoted_at: datetime = Field(default_factory=_now, description="When that state was written")


class RouteState(BaseModel):
    """Who answers a route now, and the states before (newest last) for :func:`rollback`."""

    model_config = ConfigDict(frozen=True)

    mode: RouteMode = Field(default="off", description="off, shadow, canary or full (see the module doc)")
    percent: float = Field(default=0.0, ge=0, le=100, description="Canary share answered locally, in percent")
    version: str | None = Field(default=None, max_length=128,
                                description="The promoted version id; None: never promoted")
    local_model: str | None = Field(default=None, max_length=256,
                                    description="Name the local server serves the version under")
    adapter_key: str | None = Field(default=None, max_length=1024,
                                    description="S3 key of the version's adapter, if known")
    adapter_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="sha256 of the adapter folder's index (_index.json), if known: the gateway downloads the "
        "adapter only when its index has this hash")
    history: list[RouteVersion] = Field(
        default_factory=list, description=f"Earlier states, oldest first, at most {HISTORY_LIMIT} (one per change)")
    updated_at: datetime = Field(default_factory=_now, description="When this state was written")

    @field_validator("history")
    @classmethod
    def _bounded(cls, value: list[RouteVersion]) -> list[RouteVersion]:
        return value[-HISTORY_LIMIT:]

    def current(self) -> RouteVersion | None:
        """The current state as a history entry (None when nothing was promoted)."""
        if self.version is None:
            return None
        return RouteVersion(version=self.version, mode=self.mode, percent=self.percent,
                            local_model=self.local_model, adapter_key=self.adapter_key,
                            adapter_sha256=self.adapter_sha256, promoted_at=self.updated_at)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> RouteState:
        return cls.model_validate_json(data)


def _percent_for(mode: RouteMode, percent: float | None) -> float:
    if mode == "full":
        return 100.0
    if mode in ("off", "shadow"):
        return 0.0
    if percent is None or not 0 < percent <= 100:
        raise ValueError(f"a canary needs a percent above 0 and at most 100, got {percent!r}")
    return float(percent)


def _served(entry: RouteVersion) -> tuple[object, ...]:
    """What a history entry says about who answers (its write time aside)."""
    return entry.version, entry.mode, entry.percent, entry.local_model, entry.adapter_key, entry.adapter_sha256


def promote(state: RouteState | None, version: str, mode: RouteMode, percent: float | None = None, *,
            local_model: str | None = None, adapter_key: str | None = None, adapter_sha256: str | None = None,
            now: datetime | None = None, keep: int = HISTORY_LIMIT) -> RouteState:
    """The state after promoting ``version`` in ``mode`` (``percent``: the canary share, canary only).

    Promoting the current version again (e.g. canary -> full) keeps its ``local_model``, ``adapter_key`` and
    ``adapter_sha256`` unless given (the sha256 only while the key stays the same). The state before goes to the
    history (at most ``keep`` entries, oldest dropped), unless nothing but the write time changes (a redelivered
    promotion is not pushed twice).
    """
    state = state or RouteState()
    share = _percent_for(mode, percent)
    if state.version == version:
        if adapter_key is None or adapter_key == state.adapter_key:
            adapter_sha256 = adapter_sha256 or state.adapter_sha256
        adapter_key = adapter_key or state.adapter_key
        local_model = local_model or state.local_model
    new = RouteState(mode=mode, percent=share, version=version, local_model=local_model or version,
                     adapter_key=adapter_key, adapter_sha256=adapter_sha256, updated_at=now or _now())
    history = list(state.history)
    before = state.current()
    if before is not None and _served(before) != _served(new.current()):  # type: ignore[arg-type]
        history.append(before)
    return new.model_copy(update={"history": history[-keep:] if keep > 0 else []})


def rollback(state: RouteState, *, now: datetime | None = None) -> RouteState:
    """The state after undoing the last change: the previous state as it was (version, mode, share, adapter).
    With no earlier state the route goes ``off``: the upstream answers everything."""
    if not state.history:
        return RouteState(mode="off", percent=0.0, history=[], updated_at=now or _now())
    previous = state.history[-1]
    return RouteState(mode=previous.mode, percent=previous.percent, version=previous.version,
                      local_model=previous.local_model, adapter_key=previous.adapter_key,
                      adapter_sha256=previous.adapter_sha256, history=list(state.history[:-1]),
                      updated_at=now or _now())


def bucket_of(sticky_key: str, version: str | None) -> int:
    """A stable bucket in [0, 10000) for a user or conversation key under a version (a new version reshuffles
    who is in the canary, so one unlucky group does not see every new version first)."""
    digest = hashlib.sha256(f"{version or ''}\x00{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def assign(state: RouteState, sticky_key: str) -> Side:
    """Who answers a request of ``sticky_key`` (a user or conversation id): ``"local"`` or ``"upstream"``.

    Sticky: the same key gets the same side for as long as the version and share stay. A canary of P% sends
    about P% of keys locally. ``shadow`` answers upstream (the local answer is only compared).
    """
    if state.version is None or state.mode in ("off", "shadow"):
        return "upstream"
    if state.mode == "full":
        return "local"
    return "local" if bucket_of(sticky_key, state.version) < state.percent * (_BUCKETS / 100) else "upstream"
