"""Which side answers a request: the route's state, a sticky canary split and the shadow sample.

* ``off`` (or no state, or no local server configured): upstream answers.
* ``full``: the local model answers (upstream only as a fallback).
* ``canary``: the local model answers ``percent`` % of users or conversations, sticky per request key
  (:func:`sticky_key`; the split itself is :func:`llamaduo.contracts.routes.assign`).
* ``shadow``: upstream answers; a sampled share (``shadow.sample_rate``) is also asked locally in the background.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaduo.contracts.routes import RouteState, Side, assign

#: Headers naming a conversation or a user (lower case, as Starlette gives them), first match wins.
STICKY_HEADERS = ("x-conversation-id", "x-user-id")


@dataclass(frozen=True)
class Decision:
    """Who answers first, and whether the local model is also asked in the background (shadow)."""

    side: Side
    shadow: bool = False
    version: str | None = None


def first_user_message(messages: list[Mapping[str, Any]]) -> str:
    """The text of the first user message ('' when there is none)."""
    for message in messages:
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def last_user_message(messages: list[Mapping[str, Any]]) -> str:
    """The text of the last user message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


def sticky_key(body: Mapping[str, Any], headers: Mapping[str, str]) -> str:
    """What keeps a client on one side of a canary: the request's ``user`` field, else an
    ``X-Conversation-Id`` / ``X-User-Id`` header, else a hash of the first user message (a conversation
    keeps its first message)."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    for header in STICKY_HEADERS:
        if value := headers.get(header):
            return f"{header}:{value}"
    first = first_user_message(body.get("messages") or [])
    return "first:" + hashlib.sha256(first.encode()).hexdigest()


def decide(state: RouteState | None, *, has_local: bool, key: str, sample_rate: float,
           rng: random.Random | None = None) -> Decision:
    """The :class:`Decision` for one request of a route in ``state`` (see the module docstring)."""
    if state is None or not has_local or state.mode == "off" or state.version is None:
        return Decision("upstream")
    if state.mode in ("full", "canary"):
        return Decision(assign(state, key), version=state.version)
    sampled = (rng or random).random() < sample_rate  # shadow
    return Decision("upstream", shadow=sampled, version=state.version)
