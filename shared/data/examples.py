"""The row type every dataset, oracle and service shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field


class Example(BaseModel):
    """One instruction/response pair. ``id`` is stable across rounds (seeds are tracked by it)."""

    model_config = ConfigDict(frozen=True)

    id: str
    instruction: str = Field(min_length=1)
    response: str
    source: str = Field(default="coverage", description="'coverage' or 'synthetic:<round>'")


def example_id(instruction: str, prefix: str = "x") -> str:
    """Content-derived id: the same instruction always gets the same id."""
    return f"{prefix}-{hashlib.sha256(instruction.encode()).hexdigest()[:16]}"


def to_jsonl(rows: Iterable[BaseModel]) -> Iterator[bytes]:
    """Serialise models as JSON lines, one at a time (for streaming uploads)."""
    for row in rows:
        yield (row.model_dump_json() + "\n").encode()


def examples_from_jsonl(lines: Iterable[bytes | str]) -> list[Example]:
    return [Example.model_validate(json.loads(line)) for line in lines if line.strip()]
