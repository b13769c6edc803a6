"""The gateway's OpenAI-compatible HTTP front (Starlette; no torch anywhere on this path).

* ``POST /v1/chat/completions``: routed by ``model`` (a route name); a JSON answer with ``usage``, or with
  ``"stream": true`` Server-Sent Events as ``llamaduo serve`` sends them (a role chunk, content chunks, a finish
  chunk, the usage chunk when ``stream_options.include_usage``, ``data: [DONE]``). An answer is complete before
  its first byte is sent (a local answer must pass its validator, and a failure falls back to the upstream).
* ``GET /v1/models`` (and ``/v1/models/{route}``): the routes with their current ``mode``, ``version`` and
  ``percent``; ``GET /health``; ``GET /metrics`` (Prometheus).

Headers are read only for the sticky canary key (``X-Conversation-Id`` / ``X-User-Id``); the ``Authorization``
header is never stored, published or logged. ``limits`` puts the serving guard
(:mod:`llamaduo.serving.guard`: API keys, body limit, bounded queue) in front.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from llamaduo.services.gateway.gateway import Gateway, Outcome
from llamaduo.services.gateway.metrics import CONTENT_TYPE
from llamaduo.serving.api import APIError, internal_error, model_not_found

log = logging.getLogger("llamaduo.gateway.http")

#: Characters per streamed content chunk of an answer sent whole.
CHUNK_CHARS = 16


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(outcome: Outcome) -> dict[str, int]:
    a = outcome.answer
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def completion_body(outcome: Outcome, created: int) -> dict[str, Any]:
    """The ``chat.completion`` body of an outcome."""
    return {
        "id": outcome.request_id, "object": "chat.completion", "created": created, "model": outcome.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.answer.text},
                     "logprobs": None, "finish_reason": outcome.answer.finish_reason}],
        "usage": _usage(outcome),
    }


def stream_events(outcome: Outcome, created: int) -> Iterator[str]:
    """The SSE lines of a whole answer sent as ``chat.completion.chunk`` events."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {"id": outcome.request_id, "object": "chat.completion.chunk", "created": created,
                                "model": outcome.model, "system_fingerprint": None, "choices": choices}
        if outcome.include_usage:
            data["usage"] = usage
        return _sse(data)

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    yield chunk([choice({"role": "assistant", "content": ""})])
    text = outcome.answer.text
    for start in range(0, len(text), CHUNK_CHARS):
        yield chunk([choice({"content": text[start:start + CHUNK_CHARS]})])
    yield chunk([choice({}, outcome.answer.finish_reason)])
    if outcome.include_usage:
        yield chunk([], _usage(outcome))
    yield _sse("[DONE]")


def create_app(gateway: Gateway, *, limits: Any | None = None) -> Any:
    """The ASGI app of ``gateway`` (``app.state.gateway``); ``limits``: a
    :class:`~llamaduo.serving.guard.ServingLimits` to guard it with."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": gateway.models()})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model_id"]
        found = [m for m in gateway.models() if m["id"] == name]
        if not found:
            raise model_not_found(name, list(gateway.routes))
        return JSONResponse(found[0])

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "routes": list(gateway.routes)})

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            raise APIError(400, f"The request body is not valid JSON: {err}") from None
        headers = {k: v for k, v in request.headers.items() if k in ("x-conversation-id", "x-user-id")}
        outcome = await gateway.answer(body, headers)
        created = int(time.time())
        if outcome.stream:
            return StreamingResponse(stream_events(outcome, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(completion_body(outcome, created))

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_server_error(request: Request, exc: Exception) -> Response:
        err = internal_error(log, exc, f"{request.method} {request.url.path}")
        return JSONResponse(err.body(), status_code=500)

    middleware = None
    if limits is not None:
        from llamaduo.serving.guard import guard_middleware

        middleware = guard_middleware(limits)
    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error},
    )
    app.state.gateway = gateway
    return app
