"""The OpenAI request side of the server: error bodies, the chat completion request and its messages.

Errors are OpenAI error bodies ``{"error": {"message", "type", "param", "code"}}`` (:class:`APIError`): 400
``invalid_request_error`` for a malformed body (bad JSON, missing or empty ``messages``, out-of-range values),
404 ``model_not_found`` for an unknown model, 500 ``server_error`` when generation fails: its body says only
"Internal error" and an error id, the log line carrying that id has the exception (:func:`internal_error`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Largest ``n`` (choices per request) accepted.
MAX_CHOICES = 16


class APIError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body of this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(log: logging.Logger, exc: BaseException, where: str) -> APIError:
    """The 500 answered for an unexpected ``exc``: logged (with its traceback) under a new error id, which the
    answer names; the answer holds no exception text."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    log.error("%s failed (error id %s)", where, error_id, exc_info=exc, extra={"error_id": error_id})
    return APIError(500, f"Internal error (error id {error_id}); the server log has the details under this id",
                    type="server_error", code="internal_error")


def model_not_found(name: str, known: list[str]) -> APIError:
    """The 404 answered for a model ``name`` that is not among the ``known`` (served) ones."""
    return APIError(
        404,
        f"The model {name!r} does not exist; served models: {', '.join(known) or '(none)'}",
        param="model",
        code="model_not_found",
    )


class _Lenient(BaseModel):
    """OpenAI clients send fields this server ignores (``user``, ``metadata``...): allow them."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    """One message of a request: a role and text (a string or a list of text parts)."""

    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    """``stream_options`` of a streamed request."""

    include_usage: bool | None = None


class ChatCompletionRequest(_Lenient):
    """The part of OpenAI's chat completion request body this server understands."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded request body; raise a 400 :class:`APIError` naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = _loc(first["loc"])
        msg = first["msg"]
        if first["loc"] == ("messages",) and first["type"] == "too_short":
            msg = "must be a non-empty list of messages"
        elif first["type"] == "missing":
            msg = "is required"
        raise APIError(400, f"Invalid request: '{where}' {msg}", param=where or None) from None
    if req.tools:
        raise APIError(400, "Tools / function calling are not supported by this server", param="tools")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    return req


def _text_content(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"Only text content parts are supported (messages[{index}].content[{j}] has type {part.get('type')!r})",
                param=f"messages[{index}].content",
            )
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(messages: list[ChatMessage], system_prompt: str = "") -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` messages for the chat template (``developer`` counts as ``system``).

    ``system_prompt`` is put first when the request has no system message of its own.
    """
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(
                400,
                f"messages[{i}].role {message.role!r} is not supported; use system, developer, user or assistant",
                param=f"messages[{i}].role",
            )
        out.append({"role": role, "content": _text_content(message, i)})
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out
