"""Text helpers shared by scoring, judging and synthesis: normalisation, word tokens, JSON in LLM replies."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Trim, lower-case (casefold) and collapse whitespace."""
    return _SPACE_RE.sub(" ", text.strip()).casefold()


def strip_code_fence(text: str) -> str:
    """Remove one surrounding Markdown code fence (```json ... ```), if present."""
    stripped = text.strip()
    match = _FENCE_RE.match(stripped)
    return match.group(1).strip() if match else stripped


def extract_json(text: str, *, search: bool) -> Any:
    """The JSON value of an LLM reply: the whole text, optionally inside one code fence.

    With ``search``, a text that is not JSON as a whole falls back to the span from its first ``{`` to its
    last ``}`` (a reply with words around the object). Raise ``ValueError`` when no JSON is found.
    """
    body = strip_code_fence(text)
    try:
        return json.loads(body)
    except ValueError:
        if not search:
            raise
    start, end = body.find("{"), body.rfind("}")
    if start == -1 or end <= start:
        raise ValueError(f"no JSON object in {text[:80]!r}")
    return json.loads(body[start : end + 1])


def parse_json_object(text: str) -> dict[str, Any] | None:
    """Parse ``text`` (optionally inside a code fence) as a JSON object; ``None`` if it is not one.

    Strict: no searching inside the text, so a score never credits an object buried in prose.
    """
    try:
        value = extract_json(text, search=False)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _TOKEN_RE.findall(text.casefold())
