"""The row type every dataset, oracle and service shares."""

from __future__ import annotations

import hashlib

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
