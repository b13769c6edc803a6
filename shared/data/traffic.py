"""Coverage data from a gateway route's captured traffic (``dataset.source: traffic:<route>``).

The gateway writes every answered request of a route (redacted) to JSONL batches under
``traffic/<route>/<YYYY-MM-DD>/<HHMMSS>-<batch>.jsonl`` (see :mod:`llamaduo.storage.keys`). A migration reads
the batches of its window (``dataset.traffic.since_hours``) and keeps the requests the upstream service LLM
answered: its answers are the references the student learns; answers of a local model are not training data.
Then, deterministically for ``dataset.traffic.seed``:

1. exact duplicates go (the instruction normalised: :func:`llamaduo.data.text.normalise_text`); the newest
   answer of an instruction is kept;
2. ``sample_fraction`` of the instructions stay (a seeded hash of each instruction, so a wider window keeps
   the rows a narrower one kept);
3. at most ``max_rows`` stay (a seeded sample).

The rows come back as ``{id, instruction, response}``, split by :func:`llamaduo.data.datasets.load_splits`
like the rows of any other source. The instruction is the user's last message of the request.
"""

from __future__ import annotations

import hashlib
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from llamaduo.contracts.gateway import ChatMessage
from llamaduo.contracts.spec import TrafficSourceSpec
from llamaduo.data.datasets import DatasetError
from llamaduo.data.examples import example_id
from llamaduo.data.text import normalise_text

log = logging.getLogger("llamaduo.data.traffic")


class TrafficStore(Protocol):
    """What reading traffic needs of :class:`llamaduo.storage.store.ArtifactStore`."""

    def list_traffic(self, route: str, since: datetime, until: datetime | None = None) -> list[str]: ...

    def iter_jsonl(self, key: str) -> Any: ...


class CapturedRequest(BaseModel):
    """One line of a captured traffic batch (what the gateway writes)."""

    request_id: str
    at: datetime
    messages: list[ChatMessage]
    response: str
    answered_by: Literal["local", "upstream"]
    local_version: str | None = None

    @property
    def instruction(self) -> str:
        """The user's last message ('' when there is none)."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def read_captured(store: TrafficStore, route: str, since: datetime, until: datetime) -> list[CapturedRequest]:
    """Every captured request of ``route`` in [``since``, ``until``], oldest first. Lines that are not a
    captured request are skipped (counted in a warning): capture is the gateway's, not a user's file."""
    out: list[CapturedRequest] = []
    skipped = 0
    for key in store.list_traffic(route, since, until):
        for line in store.iter_jsonl(key):
            try:
                row = CapturedRequest.model_validate(line)
            except ValidationError:
                skipped += 1
                continue
            if since <= _aware(row.at) <= until:
                out.append(row)
    if skipped:
        log.warning("captured traffic lines skipped: not a captured request", extra={"route": route,
                                                                                     "skipped": skipped})
    return sorted(out, key=lambda r: (_aware(r.at), r.request_id))


def _kept_by_fraction(normalised: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\x00{normalised}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def traffic_rows(store: TrafficStore, route: str, spec: TrafficSourceSpec | None = None, *,
                 now: datetime | None = None) -> list[dict[str, Any]]:
    """The coverage rows of ``traffic:<route>`` (see the module doc): ``{id, instruction, response}`` each.

    Raises :class:`~llamaduo.data.datasets.DatasetError` naming the route and window when no request the
    upstream answered is left.
    """
    spec = spec or TrafficSourceSpec()
    until = now or datetime.now(UTC)
    since = until - timedelta(hours=spec.since_hours)
    captured = read_captured(store, route, since, until)
    upstream = [r for r in captured if r.answered_by == "upstream" and r.instruction.strip() and r.response.strip()]
    newest: dict[str, CapturedRequest] = {}
    for row in upstream:  # oldest first: a later answer of the same instruction replaces an earlier one
        newest[normalise_text(row.instruction)] = row
    kept = {norm: row for norm, row in newest.items()
            if spec.sample_fraction >= 1 or _kept_by_fraction(norm, spec.seed, spec.sample_fraction)}
    chosen = sorted(kept)
    if spec.max_rows is not None and len(chosen) > spec.max_rows:
        chosen = sorted(random.Random(spec.seed).sample(chosen, spec.max_rows))
    log.info("traffic dataset", extra={"route": route, "captured": len(captured), "upstream": len(upstream),
                                       "unique": len(newest), "kept": len(chosen)})
    if not chosen:
        raise DatasetError(
            f"dataset.source traffic:{route}: no request answered by the upstream in the last "
            f"{spec.since_hours:g} hours ({len(captured)} captured, {len(upstream)} answered upstream); widen "
            "dataset.traffic.since_hours, raise dataset.traffic.sample_fraction, or check that the gateway "
            "captures this route (capture: true in routes.yaml)")
    return [{"id": example_id(kept[n].instruction), "instruction": kept[n].instruction,
             "response": kept[n].response} for n in chosen]
