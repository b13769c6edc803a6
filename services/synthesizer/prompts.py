"""The synthesizer's prompts: the generation request, its structured-output schema, the re-ask message and
the reply parser."""

from __future__ import annotations

import json
from typing import Any

from llamaduo.data.examples import Example
from llamaduo.data.text import extract_json
from llamaduo.providers.base import ChatMessage

#: Structured-output schema of one synthesis reply.
SYNTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"instruction": {"type": "string"}, "response": {"type": "string"}},
                "required": ["instruction", "response"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["examples"],
    "additionalProperties": False,
}

SYNTH_SYSTEM_PROMPT = (
    "You create high-quality training data for a small language model that must learn one task. "
    "You reply with a single JSON object and nothing else."
)
_REASK = (
    'Your previous reply could not be used: {error}. Reply again with only the JSON object {{"examples": '
    '[{{"instruction": "...", "response": "..."}}]}} holding {n} new examples.'
)


def reask_message(error: ValueError, n: int) -> str:
    """The user message that asks again after a reply that could not be used (``error`` says why)."""
    return _REASK.format(error=error, n=n)


def build_messages(seeds: list[Example], n: int, system_prompt: str) -> list[ChatMessage]:
    """The generation prompt: the task's system prompt, the seed examples and the output format."""
    shown = json.dumps(
        [{"instruction": s.instruction, "response": s.response} for s in seeds], ensure_ascii=False, indent=1
    )
    task = (
        f"The assistant being trained uses this system prompt:\n{system_prompt}\n\n" if system_prompt else ""
    )
    user = (
        f"{task}Here are examples of the task (instruction and the correct response):\n{shown}\n\n"
        f"Write {n} NEW examples of the same task: same kind of instruction, same style and response format, "
        "but different content from the examples above and from each other. Each response must be the "
        "correct answer to its instruction, in exactly the format the examples use.\n\n"
        'Reply with only this JSON object: {"examples": [{"instruction": "...", "response": "..."}]}'
    )
    return [ChatMessage(role="system", content=SYNTH_SYSTEM_PROMPT), ChatMessage(role="user", content=user)]


def parse_reply(text: str) -> list[Any]:
    """The ``examples`` list of a reply; raise ``ValueError`` if the reply has none."""
    try:
        data = extract_json(text, search=True)
    except ValueError:
        raise ValueError(f"not JSON: {text[:80]!r}") from None
    if isinstance(data, list):
        data = {"examples": data}
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError('no "examples" list in the reply')
    return data["examples"]

