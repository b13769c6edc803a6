"""Local stand-ins for service-LLM HTTP APIs (test code).

:class:`FakeOpenAIServer` speaks ``POST /v1/chat/completions`` (OpenAI Chat Completions) and the Batch API
(Files upload / content / delete, batch create / retrieve / cancel; each batch line is answered by the same
script and responder as a chat request, and how the batch as a whole ends is scripted with :class:`BatchPlan`);
:class:`FakeGeminiServer` speaks ``POST /{version}/models/{model}:generateContent`` (Gemini API). Each runs
a standard-library HTTP server on 127.0.0.1 (random port) in a background thread.

Scripting: every request takes the next :class:`Reply` queued with :meth:`FakeLLMServer.push`, or when the
queue is empty the server's ``responder`` (a fixed :class:`Reply`, a string, or a callback
``responder(request) -> Reply | str``; a string is a 200 reply with that content). Helpers build the usual
scripts: :meth:`Reply.ok`, :meth:`Reply.rate_limited` (429 + ``Retry-After``), :meth:`Reply.error` (500 ...),
:meth:`Reply.hang` (answers only after a delay, or when the server stops), :meth:`Reply.broken_body`
(a truncated, invalid JSON HTTP body).

Every request is recorded (:class:`Recorded`: time, path, headers, JSON body and the chat ``messages``
normalised to ``[{"role", "content"}]`` for both APIs), so tests can count calls and inspect bodies.
Usage fields (``usage.prompt_tokens``/``completion_tokens``; ``usageMetadata.promptTokenCount``/
``candidatesTokenCount``) are the reply's given counts, else 1 token per 4 characters.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass
class Reply:
    """One scripted answer."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    thoughts_tokens: int | None = None
    error_message: str = ""
    error_code: str | None = None
    error_details: list[dict[str, Any]] | None = None
    raw_body: bytes | None = None
    finish_reason: str | None = None
    include_usage: bool = True

    @classmethod
    def ok(cls, content: str, **kw: Any) -> Reply:
        return cls(content=content, **kw)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1, **kw: Any) -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(status=429, headers=headers, error_message="Rate limit reached, slow down", **kw)

    @classmethod
    def error(cls, status: int = 500, message: str = "internal error", **kw: Any) -> Reply:
        return cls(status=status, error_message=message, **kw)

    @classmethod
    def hang(cls, seconds: float = 30.0, content: str = "{}") -> Reply:
        return cls(content=content, delay=seconds)

    @classmethod
    def broken_body(cls, body: bytes = b'{"id": "x", "choices": [{"message": {"content": "{\\"sim') -> Reply:
        return cls(raw_body=body)


@dataclass
class Recorded:
    """One request the server received."""

    at: float  # time.monotonic() on arrival
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    messages: list[dict[str, str]]
    #: (prompt, completion) tokens the server reported in its reply; None for errors
    usage: tuple[int, int] | None = None

    @property
    def last_user(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


Responder = Reply | str | Callable[[Recorded], "Reply | str"]


class FakeLLMServer:
    """Base class: the thread, the script and the record. Subclasses format requests and replies."""

    api = "fake"

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder: Responder | None = responder
        self.requests: list[Recorded] = []
        self._script: deque[Reply | str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FakeLLMServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = 1 << 16  # one write per reply (no Nagle / delayed-ACK stalls)

            def do_POST(self) -> None:
                owner._handle(self)

            def do_GET(self) -> None:
                owner._handle(self)

            def do_DELETE(self) -> None:
                owner._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLLMServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting
    def push(self, *replies: Reply | str) -> None:
        """Queue replies for the next requests, in order."""
        with self._lock:
            self._script.extend(replies)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _next_reply(self, rec: Recorded) -> Reply:
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        reply: Any = scripted if scripted is not None else self.responder
        if reply is None:
            reply = Reply.ok('{"ok": true}')
        if callable(reply) and not isinstance(reply, Reply | str):
            reply = reply(rec)
        if isinstance(reply, str):
            reply = Reply.ok(reply)
        return reply

    # -- HTTP
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = Recorded(
            at=time.monotonic(),
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            messages=self.messages_of(body) if isinstance(body, dict) else [],
        )
        with self._lock:
            self.requests.append(rec)
        try:
            if self.route(handler, rec, raw):
                return
            if handler.command != "POST" or not self.accepts(handler.path):
                self._send_json(handler, 404, self.error_body(404, f"unknown path {handler.path}", None))
                return
            reply = self._next_reply(rec)
            if reply.delay > 0 and self._stopping.wait(reply.delay):
                return  # server stopping: drop the connection
            status, body_out = self.answer(rec, reply)
            if isinstance(body_out, bytes):
                self._send(handler, status, body_out, reply.headers)
            else:
                self._send_json(handler, status, body_out, reply.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def answer(self, rec: Recorded, reply: Reply) -> tuple[int, Any]:
        """``(HTTP status, JSON body or raw bytes)`` answering ``rec`` with ``reply``; sets ``rec.usage``."""
        if reply.raw_body is not None:
            return reply.status, reply.raw_body
        if reply.status != 200:
            body_out = self.error_body(reply.status, reply.error_message or "error", reply.error_code)
            if reply.error_details is not None and isinstance(body_out.get("error"), dict):
                body_out["error"]["details"] = reply.error_details
            return reply.status, body_out
        content = reply.content if reply.content is not None else ""
        prompt = sum(len(m["content"]) for m in rec.messages)
        p_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else max(1, prompt // 4)
        c_tokens = reply.completion_tokens if reply.completion_tokens is not None else max(1, len(content) // 4)
        if reply.include_usage:
            rec.usage = (p_tokens, c_tokens + (reply.thoughts_tokens or 0))
        return 200, self.success_body(rec, reply, content, p_tokens, c_tokens)

    def route(self, handler: BaseHTTPRequestHandler, rec: Recorded, raw: bytes) -> bool:
        """Answer requests other than the chat endpoint (True when answered); none by default."""
        return False

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()

    def _send_json(self, handler: BaseHTTPRequestHandler, status: int, obj: Any,
                   headers: dict[str, str] | None = None) -> None:
        self._send(handler, status, json.dumps(obj).encode(), headers)

    # -- per API
    def accepts(self, path: str) -> bool:
        raise NotImplementedError

    def messages_of(self, body: dict[str, Any]) -> list[dict[str, str]]:
        raise NotImplementedError

    def success_body(self, rec: Recorded, reply: Reply, content: str, p_tokens: int, c_tokens: int) -> Any:
        raise NotImplementedError

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        raise NotImplementedError


@dataclass
class BatchPlan:
    """How :class:`FakeOpenAIServer` runs one batch (queue with :meth:`FakeOpenAIServer.plan_batches`).

    The batch is ``validating`` when created, then ``in_progress`` for ``polls`` retrievals, then ends with
    ``status``: ``completed`` (every line answered, minus the last ``drop`` lines, which are left out);
    ``expired`` / ``cancelled`` (the first ``done`` lines answered, the rest in the error file with code
    ``batch_expired`` / ``batch_cancelled``); ``failed`` (no output; ``errors`` as the batch's
    ``errors.data``). A line answered with a non-200 reply goes to the error file with its status and body,
    as the real API does.
    """

    status: Literal["completed", "failed", "expired", "cancelled"] = "completed"
    polls: int = 1
    done: int = 0
    drop: int = 0
    errors: list[dict[str, Any]] | None = None


class FakeOpenAIServer(FakeLLMServer):
    """OpenAI Chat Completions and Batch API at ``{url}/v1`` (give that as ``base_url``).

    Batch API state is visible to tests: ``files`` (id -> uploaded or output file, ``data`` holds the bytes;
    deleted files are removed and listed in ``deleted_files``), ``uploads`` (every uploaded file, kept after
    deletion), ``batches`` (id -> the batch object as last
    served) and ``batch_lines`` (one :class:`Recorded` per answered batch line, with its usage; these are not
    in ``requests``, which holds the HTTP requests only).
    """

    api = "openai"

    def __init__(self, responder: Responder | None = None) -> None:
        super().__init__(responder)
        self.files: dict[str, dict[str, Any]] = {}
        self.deleted_files: list[str] = []
        self.uploads: list[dict[str, Any]] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_lines: list[Recorded] = []
        self.batch_plan = BatchPlan()
        self._plans: deque[BatchPlan] = deque()
        self._batch_state: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def plan_batches(self, *plans: BatchPlan) -> None:
        """Queue how the next batches run, in order (afterwards: ``batch_plan``)."""
        with self._lock:
            self._plans.extend(plans)

    # -- Batch API
    def route(self, handler: BaseHTTPRequestHandler, rec: Recorded, raw: bytes) -> bool:
        parts = [p for p in handler.path.split("?")[0].split("/") if p]
        if parts[:1] == ["v1"]:
            parts = parts[1:]
        method = handler.command
        if parts[:1] == ["files"]:
            if method == "POST" and len(parts) == 1:
                self._upload(handler, raw)
            elif method == "GET" and len(parts) == 3 and parts[2] == "content":
                with self._lock:
                    stored = self.files.get(parts[1])
                if stored is None:
                    self._send_json(handler, 404, self.error_body(404, f"no file {parts[1]}", None))
                else:
                    self._send(handler, 200, stored["data"], content_type="application/octet-stream")
            elif method == "DELETE" and len(parts) == 2:
                with self._lock:
                    found = self.files.pop(parts[1], None) is not None
                    if found:
                        self.deleted_files.append(parts[1])
                status = 200 if found else 404
                self._send_json(handler, status, {"id": parts[1], "object": "file", "deleted": True} if found
                                else self.error_body(404, f"no file {parts[1]}", None))
            else:
                return False
            return True
        if parts[:1] == ["batches"]:
            if method == "POST" and len(parts) == 1:
                self._create_batch(handler, rec.body if isinstance(rec.body, dict) else {})
            elif method == "GET" and len(parts) == 2:
                self._retrieve_batch(handler, parts[1])
            elif method == "POST" and len(parts) == 3 and parts[2] == "cancel":
                self._retrieve_batch(handler, parts[1], cancel=True)
            else:
                return False
            return True
        return False

    def _new_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{next(self._ids)}"
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        with self._lock:
            self.files[file_id] = {**meta, "data": data}
        return meta

    def _upload(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        fields = _multipart(handler.headers.get("Content-Type", ""), raw)
        if "file" not in fields or "purpose" not in fields:
            self._send_json(handler, 400, self.error_body(400, "multipart fields 'file' and 'purpose' needed", None))
            return
        filename, data = fields["file"]
        meta = self._new_file(filename or "upload.jsonl", fields["purpose"][1].decode(), data)
        with self._lock:
            self.uploads.append({**meta, "data": data})
        self._send_json(handler, 200, meta)

    def _create_batch(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        with self._lock:
            stored = self.files.get(str(body.get("input_file_id")))
            plan = self._plans.popleft() if self._plans else self.batch_plan
        if stored is None or stored["purpose"] != "batch":
            self._send_json(handler, 400, self.error_body(400, "input_file_id must name a file of purpose batch",
                                                          None))
            return
        endpoint = body.get("endpoint")
        lines: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, text in enumerate(stored["data"].decode().splitlines(), 1):
            try:
                line = json.loads(text)
            except ValueError:
                errors.append({"code": "invalid_json_line", "message": "not JSON", "line": number})
                continue
            if line.get("custom_id") in seen or line.get("method") != "POST" or line.get("url") != endpoint:
                errors.append({"code": "invalid_request", "message": "duplicate custom_id, bad method or url",
                               "line": number})
            seen.add(line.get("custom_id"))
            lines.append(line)
        if endpoint != "/v1/chat/completions":
            errors.append({"code": "invalid_endpoint", "message": f"endpoint {endpoint} not served", "line": None})
        batch_id = f"batch_{next(self._ids)}"
        batch = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "input_file_id": stored["id"],
            "completion_window": body.get("completion_window"), "status": "validating",
            "created_at": int(time.time()), "metadata": body.get("metadata"),
            "output_file_id": None, "error_file_id": None, "errors": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        if errors:
            plan = BatchPlan(status="failed", polls=0, errors=errors)
        with self._lock:
            self.batches[batch_id] = batch
            self._batch_state[batch_id] = {"plan": plan, "polls": plan.polls, "lines": lines}
        self._send_json(handler, 200, batch)

    def _retrieve_batch(self, handler: BaseHTTPRequestHandler, batch_id: str, cancel: bool = False) -> None:
        finish: str | None = None
        with self._lock:
            batch = self.batches.get(batch_id)
            state = self._batch_state.get(batch_id)
            if batch is None or state is None:
                self._send_json(handler, 404, self.error_body(404, f"no batch {batch_id}", None))
                return
            if batch["status"] in ("validating", "in_progress"):
                if cancel:
                    batch["status"] = "finalizing"
                    finish = "cancelled"
                elif state["polls"] > 0:
                    state["polls"] -= 1
                    batch["status"] = "in_progress"
                else:
                    batch["status"] = "finalizing"
                    finish = state["plan"].status
        if finish is not None:
            self._finish(batch, state["plan"], state["lines"], finish)
        with self._lock:
            snapshot = dict(batch)
        self._send_json(handler, 200, snapshot)

    def _finish(self, batch: dict[str, Any], plan: BatchPlan, lines: list[dict[str, Any]], status: str) -> None:
        out: list[bytes] = []
        err: list[bytes] = []
        if status == "completed":
            answered = lines[: max(0, len(lines) - plan.drop)]
        elif status in ("expired", "cancelled"):
            answered = lines[: plan.done] if status == plan.status else []
        else:
            answered = []
        for number, line in enumerate(answered, 1):
            body = line.get("body") if isinstance(line.get("body"), dict) else {}
            rec = Recorded(at=time.monotonic(), method="POST", path=str(line.get("url")), headers={}, body=body,
                           messages=self.messages_of(body))
            reply = self._next_reply(rec)
            with self._lock:
                self.batch_lines.append(rec)
            code, answer = self.answer(rec, reply)
            if isinstance(answer, bytes):  # a broken line, written verbatim
                out.append(answer)
                continue
            result = {"id": f"batch_req_{batch['id']}_{number}", "custom_id": line.get("custom_id"),
                      "response": {"status_code": code, "request_id": f"req_{number}", "body": answer},
                      "error": None}
            (out if code == 200 else err).append(json.dumps(result).encode())
        if status in ("expired", "cancelled"):
            for line in lines[len(answered):]:
                err.append(json.dumps({
                    "id": f"batch_req_{batch['id']}_x", "custom_id": line.get("custom_id"), "response": None,
                    "error": {"code": f"batch_{status}",
                              "message": f"This request could not be executed before the batch was {status}."},
                }).encode())
        output_id = self._new_file(f"{batch['id']}_output.jsonl", "batch_output", _jsonl(out))["id"] if out else None
        error_id = self._new_file(f"{batch['id']}_error.jsonl", "batch_output", _jsonl(err))["id"] if err else None
        with self._lock:
            batch["status"] = status
            batch[f"{status}_at"] = int(time.time())
            if status == "failed":
                batch["errors"] = {"object": "list", "data": plan.errors or [
                    {"code": "invalid_request", "message": "scripted batch failure", "line": None}]}
                return
            batch["output_file_id"], batch["error_file_id"] = output_id, error_id
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def accepts(self, path: str) -> bool:
        return path.split("?")[0].rstrip("/").endswith("/chat/completions")

    def messages_of(self, body: dict[str, Any]) -> list[dict[str, str]]:
        out = []
        for m in body.get("messages") or []:
            content = m.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({"role": str(m.get("role")), "content": str(content or "")})
        return out

    def success_body(self, rec: Recorded, reply: Reply, content: str, p_tokens: int, c_tokens: int) -> Any:
        body: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": (rec.body or {}).get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reply.finish_reason or "stop",
                }
            ],
        }
        if reply.include_usage:
            body["usage"] = {
                "prompt_tokens": p_tokens,
                "completion_tokens": c_tokens,
                "total_tokens": p_tokens + c_tokens,
            }
        return body

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        kind = {429: "rate_limit_error", 400: "invalid_request_error", 401: "authentication_error"}
        return {"error": {"message": message, "type": kind.get(status, "server_error"), "code": code}}


class FakeGeminiServer(FakeLLMServer):
    """Gemini API ``models/{model}:generateContent`` at ``url`` (give that as ``base_url``)."""

    api = "gemini"

    @property
    def base_url(self) -> str:
        return self.url

    def accepts(self, path: str) -> bool:
        return ":generatecontent" in path.split("?")[0].lower()

    def messages_of(self, body: dict[str, Any]) -> list[dict[str, str]]:
        out = []
        system = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(system, dict):
            out.append({"role": "system", "content": _parts_text(system)})
        for c in body.get("contents") or []:
            role = {"model": "assistant"}.get(c.get("role", "user"), c.get("role", "user"))
            out.append({"role": role, "content": _parts_text(c)})
        return out

    def success_body(self, rec: Recorded, reply: Reply, content: str, p_tokens: int, c_tokens: int) -> Any:
        body: dict[str, Any] = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": content}]},
                    "finishReason": reply.finish_reason or "STOP",
                    "index": 0,
                }
            ],
            "modelVersion": rec.path.split("/models/")[-1].split(":")[0],
        }
        if reply.include_usage:
            usage = {"promptTokenCount": p_tokens, "candidatesTokenCount": c_tokens,
                     "totalTokenCount": p_tokens + c_tokens + (reply.thoughts_tokens or 0)}
            if reply.thoughts_tokens is not None:
                usage["thoughtsTokenCount"] = reply.thoughts_tokens
            body["usageMetadata"] = usage
        return body

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        names = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL", 503: "UNAVAILABLE"}
        return {"error": {"code": status, "message": message, "status": code or names.get(status, "UNKNOWN")}}


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``{field: (filename, bytes)}`` of a ``multipart/form-data`` body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _parts_text(content: dict[str, Any]) -> str:
    return "".join(str(p.get("text", "")) for p in content.get("parts") or [] if isinstance(p, dict))


# ------------------------------------------------------------------------------------------ responders


def judge_prompt_parts(text: str) -> tuple[str, str, str]:
    """``(instruction, reference, candidate)`` from a judge prompt built by the judge's ``build_messages``."""
    _, _, rest = text.partition("### Instruction\n")
    instruction, _, rest = rest.partition("\n\n### Reference answer\n")
    reference, _, candidate = rest.partition("\n\n### Candidate answer\n")
    return instruction, reference, candidate


def oracle_judge(oracle: Any) -> Callable[[Recorded], str]:
    """A responder that judges like the task oracle (``oracle.score``) from the judge prompt's texts."""

    def respond(rec: Recorded) -> str:
        first_user = next((m["content"] for m in rec.messages if m["role"] == "user"), "")
        instruction, reference, candidate = judge_prompt_parts(first_user)
        sim, prec = oracle.score(instruction, reference, candidate)
        return json.dumps({"similarity": round(sim), "precision": round(prec), "reason": "oracle judgement"})

    return respond


# ------------------------------------------------------------------------------------------ time doubles


class FakeClock:
    """A manual monotonic clock whose ``sleep`` advances time at once (and records each delay)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class RecordingSleep:
    """A real ``asyncio.sleep`` that records every delay asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(seconds)
