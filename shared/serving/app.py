"""The HTTP app: OpenAI-compatible routes over a :class:`~llamaduo.serving.registry.ModelRegistry`.

* ``GET /v1/models`` and ``GET /v1/models/{id}``: the served models;
* ``POST /v1/chat/completions``: a JSON answer with ``usage``, or with ``"stream": true`` Server-Sent Events
  (``data: {chat.completion.chunk}`` lines, then ``data: [DONE]``; with ``stream_options.include_usage`` a last
  chunk with empty ``choices`` carries ``usage``). ``temperature``, ``top_p``, ``max_tokens`` (or
  ``max_completion_tokens``), ``n``, ``stop`` and ``seed`` are honoured;
* ``GET /health`` (never asks for a key);
* with an adapters folder, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
  (:mod:`~llamaduo.serving.adapters`).

The app stands behind the guard (:mod:`~llamaduo.serving.guard`: API keys, body limit, bounded queue) and caps
``max_tokens`` x ``n``. Errors are OpenAI error bodies (:class:`~llamaduo.serving.api.APIError`); a 500 names an
error id, never the exception. Generation runs in worker threads; the event loop only moves bytes. A client that
goes away (streaming or not) cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from llamaduo.contracts.spec import InferenceSpec, StudentSpec
from llamaduo.serving.api import APIError, chat_messages, internal_error, parse_request
from llamaduo.serving.engine import Generation, GenerationParams, ModelDefaults, ServedModel
from llamaduo.serving.guard import ServingLimits, check_token_budget, guard_middleware
from llamaduo.serving.registry import ModelRegistry

log = logging.getLogger(__name__)


def _usage(prompt_tokens: int, results: list[Generation]) -> dict[str, int]:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _watch_disconnect(receive: Any, cancel: threading.Event) -> None:
    """Set ``cancel`` once the client goes away (the request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def create_app(
    models: Mapping[str, Path | str],
    student: StudentSpec | None = None,
    *,
    system_prompt: str = "",
    registry: ModelRegistry | None = None,
    defaults: Mapping[str, ModelDefaults] | None = None,
    limits: ServingLimits | None = None,
    adapters_dir: Path | str | None = None,
) -> Any:
    """The ASGI (Starlette) app serving ``models`` (name -> model folder), loaded now, behind the guard.

    ``student``: its ``inference`` settings give the defaults of requests that leave them out (``max_tokens`` =
    ``max_new_tokens``, ``temperature``); without it, :class:`~llamaduo.contracts.spec.InferenceSpec`'s defaults.
    ``system_prompt``: put first when a request has no system message (the task's system prompt, so a client can
    send just the user's text). A model's own :class:`ModelDefaults` (``defaults`` by name, or set on the
    registry) come before both. ``registry``: already loaded models (then ``models`` and ``defaults`` are ignored).
    ``limits``: keys, body size, token cap, queue (default: :class:`ServingLimits`'s, no key asked).
    ``adapters_dir``: serve the run-time adapter endpoints, loading from inside that folder only.
    The registry is ``app.state.registry``, the limits ``app.state.limits``.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    reg = registry if registry is not None else ModelRegistry(models, defaults)
    app_inference = student.inference if student is not None else InferenceSpec()
    limits = limits or ServingLimits()

    class EventStream(StreamingResponse):
        """Server-Sent Events; a client gone mid-stream is no server error."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            except ClientDisconnect:
                log.info("the client went away mid-stream")

    def answering_errors(handler: Any) -> Any:
        """``handler`` answering its own errors: APIError as itself, anything else as a 500 with an error id."""

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as err:
                return JSONResponse(err.body(), status_code=err.status)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody to answer
            except Exception as exc:
                err = internal_error(log, exc, f"{request.method} {request.url.path}")
                return JSONResponse(err.body(), status_code=err.status)

        return wrapped

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [m.info() for m in reg]})

    async def get_model(request: Request) -> Response:
        return JSONResponse(reg.get(request.path_params["model_id"]).info())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": reg.names})

    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise APIError(400, f"The request body is not valid JSON: {err}") from None
        req = parse_request(body)
        served = reg.get(req.model)
        own = served.defaults
        defaults = own.inference or app_inference
        messages = chat_messages(req.messages, system_prompt if own.system_prompt is None else own.system_prompt)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = GenerationParams(
            max_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=tuple(s for s in stop if s),
        )
        n = req.n or 1
        check_token_budget(params.max_tokens, n, limits)
        prompt_ids = await asyncio.to_thread(served.prompt_ids, messages)
        served.max_new_tokens(prompt_ids, params.max_tokens)  # a prompt too long is a 400, before any stream starts
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(served, prompt_ids, params, n, completion_id, created, include_usage, request.receive)
            return EventStream(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        cancel = threading.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, cancel))
        try:
            results = await asyncio.to_thread(served.generate, prompt_ids, params, n=n, cancel=cancel)
        finally:
            watcher.cancel()
        if cancel.is_set():
            log.info("the client went away: generation of %s stopped", completion_id)
            return Response(status_code=499)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": served.name,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": None,
                        "finish_reason": r.finish_reason,
                    }
                    for i, r in enumerate(results)
                ],
                "usage": _usage(len(prompt_ids), results),
            }
        )

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_server_error(request: Request, exc: Exception) -> Response:
        err = internal_error(log, exc, f"{request.method} {request.url.path}")
        return JSONResponse(err.body(), status_code=500)

    routes = [
        Route("/v1/models", answering_errors(list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", answering_errors(get_model), methods=["GET"]),
        Route("/v1/chat/completions", answering_errors(chat_completions), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    if adapters_dir is not None:
        from llamaduo.serving.adapters import adapter_routes

        routes += [Route(r.path, answering_errors(r.endpoint), methods=r.methods)
                   for r in adapter_routes(reg, Path(adapters_dir))]
        if not (limits.api_keys or limits.admin_api_keys):
            log.warning("adapters can be loaded at run time and no API key is set: anyone reaching this server "
                        "can load adapters from %s", adapters_dir)
    app = Starlette(
        routes=routes,
        middleware=guard_middleware(limits),
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error},
    )
    app.state.registry, app.state.limits = reg, limits
    return app


async def _stream(
    served: ServedModel,
    prompt_ids: list[int],
    params: GenerationParams,
    n: int,
    completion_id: str,
    created: int,
    include_usage: bool,
    receive: Any,
) -> AsyncIterator[str]:
    """SSE lines of a streamed completion; generation runs in its own thread and feeds an asyncio queue.

    ``receive``: the request's ASGI receive, watched for the client going away (then the generation stops)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    cancel = threading.Event()

    def post(item: tuple[Any, ...]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server stopped): stop generating
            cancel.set()

    def work() -> None:
        try:
            results = served.generate(
                prompt_ids, params, n=n, on_delta=lambda i, d: post(("delta", i, d)), cancel=cancel
            )
            post(("done", results))
        except BaseException as err:
            post(("error", err))

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    threading.Thread(target=work, name=f"llamaduo-serve-{completion_id[-8:]}", daemon=True).start()
    watcher = asyncio.ensure_future(_watch_disconnect(receive, cancel))
    try:
        for i in range(n):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        while True:
            item = await queue.get()
            if item[0] == "delta":
                yield chunk([choice(item[1], {"content": item[2]})])
            elif item[0] == "error":
                err = item[1]
                if not isinstance(err, APIError):
                    err = internal_error(log, err, f"streamed generation {completion_id}")
                yield _sse(err.body())
                return
            else:
                results: list[Generation] = item[1]
                for i, r in enumerate(results):
                    yield chunk([choice(i, {}, r.finish_reason)])
                if include_usage:
                    yield chunk([], _usage(len(prompt_ids), results))
                yield _sse("[DONE]")
                return
    finally:
        watcher.cancel()
        cancel.set()  # a client gone mid-stream stops the generation at its next token
