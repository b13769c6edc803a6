"""Every object key of a migration, and of a gateway route's captured traffic, in one place.

Keys live under ``migrations/{migration_id}/...`` and are built only from validated ids and checked parts, so a
migration cannot address another one's objects. Captured traffic lives under
``traffic/{route}/{YYYY-MM-DD}/{HHMMSS}-{batch}.jsonl`` (UTC), the route name validated the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from llamaduo.contracts.events import validate_migration_id
from llamaduo.contracts.routes import validate_route_name
from llamaduo.errors import StoreError

_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_part(part: str) -> str:
    if not _PART_RE.fullmatch(part) or ".." in part:
        raise StoreError(f"artifact key part {part!r} is not allowed (letters, digits, '.', '_', '-' only)")
    return part


def migration_key(migration_id: str, *parts: str) -> str:
    """``migrations/{id}/{parts...}`` with every part checked."""
    validate_migration_id(migration_id)
    return "/".join(["migrations", migration_id, *(_check_part(p) for p in parts)])


def check_key(key: str) -> str:
    """``key`` when it is a plain relative key; raise :class:`StoreError` when it is absolute or holds
    ``.``/``..``/empty parts or a backslash."""
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"artifact key {key!r} is not allowed: absolute, or with empty, '.' or '..' parts")
    return key


def require_own_key(migration_id: str, key: str, allowed_prefixes: Iterable[str] = ()) -> str:
    """``key`` when it lies under the migration's prefix ``migrations/{id}/`` (or one of ``allowed_prefixes``,
    the operator's dataset prefixes); raise :class:`StoreError` naming the key otherwise.

    Every key a spec or an event names goes through this before it is read: a key that is absolute, holds
    ``.``/``..``/empty parts or a backslash, or lies under another migration's prefix is refused.
    """
    try:
        own = migration_key(migration_id) + "/"
    except ValueError as err:
        raise StoreError(f"artifact key {key!r}: {err}") from None
    check_key(key)
    prefixes = [own, *(p.strip().lstrip("/").rstrip("/") + "/" for p in allowed_prefixes if p.strip("/ "))]
    if not any(key.startswith(prefix) for prefix in prefixes):
        raise StoreError(f"artifact key {key!r} is not under migration {migration_id}'s prefix {own!r}"
                         + (f" nor an allowed prefix {prefixes[1:]}" if prefixes[1:] else ""))
    return key


def round_key(migration_id: str, round: int, *parts: str) -> str:
    return migration_key(migration_id, f"round-{int(round)}", *parts)


def spec_key(migration_id: str) -> str:
    return migration_key(migration_id, "spec.json")


def data_key(migration_id: str, split: str) -> str:
    """S3 key of a stored split: ``train``, ``coverage``, ``test`` (the eval split) or ``holdout``."""
    return migration_key(migration_id, "data", f"{split}.jsonl")


def answered_data_key(migration_id: str, split: str) -> str:
    """S3 key of the stored split a judge ``split`` answers: the eval split (``test``) for 'eval' and 'baseline'
    (the route's current model on the same prompts), the holdout for 'holdout'."""
    return data_key(migration_id, "test" if split in ("eval", "baseline") else split)


def baseline_adapter_key(migration_id: str, round: int) -> str:
    """S3 folder of the route's current adapter as copied for the baseline (``promotion.only_if_better``)."""
    return round_key(migration_id, round, "baseline", "adapter")


#: Object written (by the controller) when a round's judging is closed before all its batches were judged;
#: judge workers skip batches of such a round.
JUDGING_CLOSED = "judging-closed"


def judging_closed_key(migration_id: str, round: int) -> str:
    """S3 key of the marker saying the round's judging is closed: remaining batches are not judged."""
    return round_key(migration_id, round, JUDGING_CLOSED)


def _split_parts(split: str) -> tuple[str, ...]:
    """Folder of a split's objects inside a round: the eval split at the round's top, others (the holdout,
    judged once at the end) in their own folder, so nothing reading the eval split's objects sees them."""
    return () if split == "eval" else (_check_part(split),)


def shard_key(migration_id: str, round: int, index: int, split: str = "eval") -> str:
    """S3 key of a round's predictions shard ``index`` (the inference service stores them as it goes)."""
    return round_key(migration_id, round, *_split_parts(split), "predictions", f"shard-{index:05d}.jsonl")


def predictions_key(migration_id: str, round: int, split: str = "eval") -> str:
    """S3 key of a round's predictions, its shards joined (what ``infer.done`` points at)."""
    return round_key(migration_id, round, *_split_parts(split), "predictions.jsonl")


def batch_scores_key(migration_id: str, round: int, batch: int, split: str = "eval") -> str:
    """S3 key of one judged batch's scores (one ``Score`` per line), written by the judge before ``eval.scored``;
    holdout batches under ``round-N/holdout/scores/`` (outside :func:`batch_scores_prefix`)."""
    return round_key(migration_id, round, *_split_parts(split), "scores", f"batch-{batch:05d}.jsonl")


def batch_scores_prefix(migration_id: str, round: int) -> str:
    """S3 folder holding a round's batch score objects (see :func:`batch_scores_key`)."""
    return round_key(migration_id, round, "scores") + "/"


def checkpoint_prefix(migration_id: str, round: int) -> str:
    """S3 folder holding the newest training checkpoint of a round."""
    return round_key(migration_id, round, "checkpoints", "latest")


# ------------------------------------------------------------------------------------ captured traffic

#: Top folder of every route's captured traffic.
TRAFFIC_ROOT = "traffic"
_TRAFFIC_NAME_RE = re.compile(r"^(\d{6})-[A-Za-z0-9][A-Za-z0-9_-]*\.jsonl$")


def _route(route: str) -> str:
    try:
        return validate_route_name(route)
    except ValueError as err:
        raise StoreError(f"traffic key: {err}") from None


def traffic_prefix(route: str) -> str:
    """S3 folder of a route's captured traffic: ``traffic/{route}/``."""
    return f"{TRAFFIC_ROOT}/{_route(route)}/"


def traffic_day_prefix(route: str, day: date) -> str:
    """S3 folder of a route's traffic captured on ``day`` (UTC): ``traffic/{route}/{YYYY-MM-DD}/``."""
    return f"{traffic_prefix(route)}{day:%Y-%m-%d}/"


def traffic_key(route: str, at: datetime, batch_id: str) -> str:
    """S3 key of one captured JSONL batch: ``traffic/{route}/{YYYY-MM-DD}/{HHMMSS}-{batch_id}.jsonl``, the time
    the batch started, in UTC (a naive ``at`` is taken as UTC)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", batch_id):
        raise StoreError(f"traffic batch id {batch_id!r} is not allowed (letters, digits, '_', '-' only)")
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return f"{traffic_day_prefix(route, at.date())}{at:%H%M%S}-{batch_id}.jsonl"


def traffic_key_time(key: str) -> datetime | None:
    """The UTC time a traffic batch key names (None when ``key`` is not a batch key)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != TRAFFIC_ROOT:
        return None
    match = _TRAFFIC_NAME_RE.fullmatch(parts[3])
    if match is None:
        return None
    try:
        return datetime.strptime(f"{parts[2]} {match.group(1)}", "%Y-%m-%d %H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def traffic_days(since: datetime, until: datetime) -> list[date]:
    """The UTC days from ``since`` to ``until`` (both included), oldest first: the day folders a window spans."""
    first, last = since.astimezone(UTC).date(), until.astimezone(UTC).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]
