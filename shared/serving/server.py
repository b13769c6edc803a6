"""OpenAI-compatible HTTP server for migrated students: the engine of ``llamaduo serve``.

Serves one or more model folders under the names a client passes as ``model``:

* ``GET /v1/models`` and ``GET /v1/models/{id}``: the served models;
* ``POST /v1/chat/completions``: a JSON answer with ``usage``, or with ``"stream": true`` Server-Sent Events
  (``data: {chat.completion.chunk}`` lines, then ``data: [DONE]``; with ``stream_options.include_usage`` a last
  chunk with empty ``choices`` carries ``usage``). ``temperature``, ``top_p``, ``max_tokens`` (or
  ``max_completion_tokens``), ``n``, ``stop`` and ``seed`` are honoured;
* ``GET /health``.

Errors are OpenAI error bodies ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` for a malformed body (bad JSON, missing or empty ``messages``, out-of-range values),
404 ``model_not_found`` for an unknown model, 500 ``server_error`` when generation fails.

A folder is a trained student (what :func:`llamaduo.services.trainer.domain.train` saves, described by its
``llamaduo_student.json``) or a plain model folder (``config.json`` and a tokenizer). LoRA students of the same
base model (same base folder and quantization) share one copy of the base: the first adapter is loaded with
``PeftModel.from_pretrained``, the others with ``load_adapter``, and each request switches with ``set_adapter``
under that base's lock. A lone unquantized LoRA student is merged into its base, as in
:class:`~llamaduo.services.inference.domain.StudentGenerator`. Full students and plain folders load on their own.

Each model may have its own request defaults (:class:`ModelDefaults`: a migration's inference settings and system
prompt, see :func:`migration_defaults`). :func:`serve` blocks (``llamaduo serve``); :class:`BackgroundServer` serves
from a thread and takes more models while it runs (the inference service, once a migration completes, when its
spec's ``serve.enabled`` is set). :func:`fetch_migration_model` is how both find a migration's chosen model.

Prompts go through the model's chat template exactly as in training and evaluation; answers are the generated
tokens up to the first stop token, decoded and stripped (the same text ``StudentGenerator.generate`` gives).
``usage.completion_tokens`` counts those generated tokens, not the stop token. Generation runs in worker
threads, one request at a time per loaded model; the event loop only moves bytes. Heavy libraries (torch,
transformers, peft, uvicorn) are imported when first needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaduo.contracts.spec import InferenceSpec, MigrationSpec, StudentSpec
from llamaduo.models.generation import stop_token_ids
from llamaduo.models.loading import STUDENT_META_FILE, load_causal_lm, load_tokenizer, read_student_meta
from llamaduo.models.resolve import ModelResolutionError, resolve_base_model

if TYPE_CHECKING:
    from llamaduo.storage.store import ArtifactStore

log = logging.getLogger(__name__)

#: Largest ``n`` (choices per request) accepted.
MAX_CHOICES = 16
#: ``owned_by`` of every served model.
OWNER = "llamaduo"


# --------------------------------------------------------------------------------------------- errors


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _model_not_found(name: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model {name!r} does not exist; served models: {', '.join(known) or '(none)'}",
        param="model",
        code="model_not_found",
    )


# --------------------------------------------------------------------------------------------- request body


class _Lenient(BaseModel):
    """OpenAI clients send fields this server ignores (``user``, ``metadata``...): allow them."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
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


# --------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one request."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Generation:
    """One answer: its text, token counts and why it ended (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...]


#: ``on_delta(choice_index, text)``: called (in the generation thread) with each new piece of an answer.
DeltaCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model request defaults; a ``None`` field falls back to the app's (see :func:`create_app`)."""

    inference: InferenceSpec | None = None
    system_prompt: str | None = None


class _Backend:
    """One loaded torch model (a base with its adapters, or a whole model) and the lock serializing its use."""

    def __init__(self, model: Any, adapters: list[str] | None = None) -> None:
        self.model = model
        self.adapters = adapters or []
        self.active: str | None = self.adapters[0] if self.adapters else None
        self.lock = threading.Lock()


class _Answer:
    """Turns generated token ids into answer text, and into deltas while they come (a ``generate`` streamer).

    The visible text is the decoded ids up to the first stop token, left-stripped, cut at the first stop string.
    While generating, trailing whitespace, an unfinished UTF-8 sequence and a tail that may start a stop string
    are held back, so the streamed pieces always add up to the final (right-stripped) text.
    """

    def __init__(
        self, tokenizer: Any, stop_ids: set[int], stop: tuple[str, ...], on_delta: Callable[[str], None] | None
    ) -> None:
        self.tokenizer, self.stop_ids, self.stop, self.on_delta = tokenizer, stop_ids, stop, on_delta
        self.ids: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def text(self, ids: list[int]) -> tuple[str, bool]:
        """``(visible text, whether a stop string cut it)`` of the new token ids ``ids``."""
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True).lstrip()
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(found)], True) if found else (text, False)

    # streamer protocol of transformers' generate: put(prompt ids), put(new ids) per step, end()
    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        if self.on_delta is None:
            return
        text, hit = self.text(self.ids)
        text = text.rstrip()
        if not hit:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        self._emit(text)

    def end(self) -> None:
        pass

    def _emit(self, text: str) -> None:
        if self.on_delta is not None and len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent) :], text
            self.on_delta(delta)

    def finish(self, ids: list[int]) -> tuple[str, bool]:
        """The final text of ``ids`` (the whole generated sequence); emits what is still held back."""
        text, hit = self.text(ids)
        text = text.rstrip()
        self._emit(text)
        return text, hit


def _halt_criteria(should_stop: Callable[[Any], bool]) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Halt(StoppingCriteria):
        """Stops generation when a stop string appeared or the client went away."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), should_stop(input_ids), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Halt()])


class ServedModel:
    """One model as clients see it: a name, a tokenizer with its chat template, a (shared) loaded model."""

    def __init__(
        self,
        name: str,
        path: Path,
        tokenizer: Any,
        backend: _Backend,
        *,
        adapter: str | None = None,
        method: str = "plain",
        base_model: str | None = None,
        created: int | None = None,
        defaults: ModelDefaults | None = None,
    ) -> None:
        self.name, self.path, self.tokenizer, self.backend, self.adapter = name, path, tokenizer, backend, adapter
        self.method, self.base_model = method, base_model
        self.defaults = defaults or ModelDefaults()
        self.created = created if created is not None else int(time.time())
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()
        self.context_length: int | None = getattr(backend.model.config, "max_position_embeddings", None)

    def _stop_ids(self) -> set[int]:
        return set(stop_token_ids(self.tokenizer))

    def info(self) -> dict[str, Any]:
        """The OpenAI model object of this model."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "llamaduo": {"method": self.method, "base_model": self.base_model},
        }

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the chat template, with the assistant turn opened (as in training)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def max_new_tokens(self, prompt_ids: list[int], requested: int) -> int:
        """``requested``, capped by the room the context leaves; a 400 :class:`APIError` when there is none."""
        if not prompt_ids:
            raise APIError(400, "The prompt is empty", param="messages")
        if self.context_length is None:
            return requested
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise APIError(
                400,
                f"The prompt has {len(prompt_ids)} tokens; model {self.name!r} takes at most {self.context_length}",
                param="messages",
                code="context_length_exceeded",
            )
        return min(requested, room)

    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        n: int = 1,
        on_delta: DeltaCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Generation]:
        """``n`` answers to ``prompt_ids`` (blocking; call it from a worker thread).

        Greedy (temperature 0) answers are generated once and repeated ``n`` times. With ``params.seed`` the
        sampled answers are reproducible. ``cancel`` set: generation stops at the next token.
        """
        import torch

        max_new = self.max_new_tokens(prompt_ids, params.max_tokens)
        backend = self.backend
        with backend.lock:
            if self.adapter is not None and backend.active != self.adapter:
                backend.model.set_adapter(self.adapter)
                backend.active = self.adapter
            if not params.greedy and params.seed is not None:
                torch.manual_seed(params.seed)
            results: list[Generation] = []
            for index in range(1 if params.greedy else n):
                targets = list(range(n)) if params.greedy else [index]

                def emit(delta: str, targets: list[int] = targets) -> None:
                    for i in targets:
                        on_delta(i, delta)  # type: ignore[misc]

                results.append(self._generate_one(prompt_ids, params, max_new, emit if on_delta else None, cancel))
        return results * n if params.greedy else results

    def _generate_one(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        max_new: int,
        on_delta: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> Generation:
        import torch

        model = self.backend.model
        answer = _Answer(self.tokenizer, self.stop_ids, params.stop, on_delta)
        plen = len(prompt_ids)

        def should_stop(input_ids: Any) -> bool:
            if cancel is not None and cancel.is_set():
                return True
            return bool(params.stop) and answer.text(input_ids[0, plen:].tolist())[1]

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": sorted(self.stop_ids),
            "pad_token_id": self.tokenizer.pad_token_id,
            "streamer": answer,
            "stopping_criteria": _halt_criteria(should_stop),
        }
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new = out[0, plen:].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        ids = new if cut is None else new[:cut]
        text, hit = answer.finish(ids)
        finish = "stop" if cut is not None or hit or len(ids) < max_new else "length"
        return Generation(text, plen, len(ids), finish, tuple(ids))


# --------------------------------------------------------------------------------------------- loading


def _base_folder(meta: dict[str, Any], model_dir: Path) -> str:
    try:
        return resolve_base_model(meta["base_model"])
    except ModelResolutionError:
        saved = meta.get("base_model_path")
        if saved and Path(saved).is_dir():
            return str(saved)
        raise


class ModelRegistry:
    """The served models by name, loaded at construction (see the module docstring for how).

    ``defaults``: per-model request defaults by name (see :class:`ModelDefaults`). :meth:`add` adds or replaces
    models while the registry is being served.
    """

    def __init__(self, models: Mapping[str, Path | str], defaults: Mapping[str, ModelDefaults] | None = None) -> None:
        if not models:
            raise ValueError("serving needs at least one model")
        folders: dict[str, Path] = {}
        for name, path in models.items():
            if not name or not name.strip():
                raise ValueError("served model names must be non-empty")
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"model {name!r}: {folder} is not a folder")
            if not (folder / STUDENT_META_FILE).is_file() and not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"model {name!r}: {folder} is neither a trained student ({STUDENT_META_FILE}) nor a model folder "
                    "(config.json)"
                )
            folders[name] = folder
        created = int(time.time())
        self.models: dict[str, ServedModel] = {}
        self.backends: list[_Backend] = []
        lora_groups: dict[tuple[str, str], list[tuple[str, Path, dict[str, Any]]]] = {}
        for name, folder in folders.items():
            meta = read_student_meta(folder) if (folder / STUDENT_META_FILE).is_file() else None
            if meta is not None and meta["method"] == "lora":
                base = str(Path(_base_folder(meta, folder)).resolve())
                lora_groups.setdefault((base, meta["quantization"]), []).append((name, folder, meta))
                continue
            backend = _Backend(load_causal_lm(folder).eval())
            self.backends.append(backend)
            method = meta["method"] if meta else "plain"
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, method=method,
                base_model=meta.get("base_model") if meta else None, created=created,
            )  # fmt: skip
        for (base, quantization), group in lora_groups.items():
            self._load_lora_group(base, quantization, group, created)
        self.models = {name: self.models[name] for name in folders}  # the order given
        for name, model in self.models.items():
            model.defaults = (defaults or {}).get(name) or ModelDefaults()

    def add(self, other: ModelRegistry) -> list[str]:
        """Serve ``other``'s models too; a model of the same name is replaced. Returns the replaced names.

        Requests already running on a replaced model finish on it; new ones get the new model.
        """
        replaced = [name for name in other.models if name in self.models]
        self.models = {**self.models, **other.models}
        used = {id(m.backend) for m in self.models.values()}
        self.backends = [b for b in [*self.backends, *other.backends] if id(b) in used]
        return replaced

    def _load_lora_group(
        self, base: str, quantization: str, group: list[tuple[str, Path, dict[str, Any]]], created: int
    ) -> None:
        from peft import PeftModel

        base_model = load_causal_lm(base, quantization)
        if len(group) == 1 and quantization == "none":
            name, folder, meta = group[0]
            model = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload().eval()
            backend = _Backend(model)
            self.backends.append(backend)
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, method="lora", base_model=meta["base_model"],
                created=created,
            )  # fmt: skip
            return
        adapters = [f"adapter_{i}" for i in range(len(group))]
        model = None
        for adapter, (_, folder, _) in zip(adapters, group, strict=True):
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter)
            else:
                model.load_adapter(str(folder), adapter_name=adapter)
        assert model is not None
        model.set_adapter(adapters[0])
        model.eval()
        backend = _Backend(model, adapters)
        self.backends.append(backend)
        for adapter, (name, folder, meta) in zip(adapters, group, strict=True):
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, adapter=adapter, method="lora",
                base_model=meta["base_model"], created=created,
            )  # fmt: skip

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        """The model named ``name``; a 404 :class:`APIError` (``model_not_found``) when there is none."""
        try:
            return self.models[name]
        except KeyError:
            raise _model_not_found(name, self.names) from None

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())


# --------------------------------------------------------------------------------------------- HTTP


def _usage(prompt_tokens: int, results: list[Generation]) -> dict[str, int]:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    models: Mapping[str, Path | str],
    student: StudentSpec | None = None,
    *,
    system_prompt: str = "",
    registry: ModelRegistry | None = None,
    defaults: Mapping[str, ModelDefaults] | None = None,
) -> Any:
    """The ASGI (Starlette) app serving ``models`` (name -> model folder), loaded now.

    ``student``: its ``inference`` settings give the defaults of requests that leave them out (``max_tokens`` =
    ``max_new_tokens``, ``temperature``); without it, :class:`~llamaduo.contracts.spec.InferenceSpec`'s defaults.
    ``system_prompt``: put first when a request has no system message (the task's system prompt, so a client can
    send just the user's text). A model's own :class:`ModelDefaults` (``defaults`` by name, or set on the
    registry) come before both. ``registry``: already loaded models (then ``models`` and ``defaults`` are ignored).
    The registry is ``app.state.registry``.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    reg = registry if registry is not None else ModelRegistry(models, defaults)
    app_inference = student.inference if student is not None else InferenceSpec()

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
        prompt_ids = await asyncio.to_thread(served.prompt_ids, messages)
        served.max_new_tokens(prompt_ids, params.max_tokens)  # a prompt too long is a 400, before any stream starts
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(served, prompt_ids, params, n, completion_id, created, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        results = await asyncio.to_thread(served.generate, prompt_ids, params, n=n)
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
        log.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
        err = APIError(500, f"The server failed: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error},
    )
    app.state.registry = reg
    return app


async def _stream(
    served: ServedModel,
    prompt_ids: list[int],
    params: GenerationParams,
    n: int,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE lines of a streamed completion; generation runs in its own thread and feeds an asyncio queue."""
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
                    log.error("streamed generation failed", exc_info=err)
                    err = APIError(500, f"Generation failed: {type(err).__name__}: {err}", type="server_error")
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
        cancel.set()  # a client gone mid-stream stops the generation at its next token


# --------------------------------------------------------------------------------------------- running


def serve(
    models: Mapping[str, Path | str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    student: StudentSpec | None = None,
    system_prompt: str = "",
    defaults: Mapping[str, ModelDefaults] | None = None,
    log_level: str = "info",
) -> None:
    """Load ``models`` and serve them over HTTP until interrupted (blocking). See :func:`create_app`."""
    import uvicorn

    app = create_app(models, student, system_prompt=system_prompt, defaults=defaults)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _bind(host: str, port: int) -> Any:
    """A TCP socket bound to ``host:port`` (0: a free port); ``OSError`` when the port is taken."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """uvicorn serving an ASGI app in a daemon thread of this process, on an already bound socket.

    Build it with :meth:`start`; ``url`` is its base URL (``http://host:port``); :meth:`stop` ends it.
    """

    def __init__(self, server: Any, thread: threading.Thread, sock: Any, host: str) -> None:
        self.server, self.thread, self.sock = server, thread, sock
        self.port: int = sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @classmethod
    def start(
        cls, app: Any, host: str = "127.0.0.1", port: int = 0, *, sock: Any | None = None, timeout: float = 30.0,
        log_level: str = "warning",
    ) -> ServerThread:
        """Serve ``app`` on ``sock`` (default: bind ``host:port`` now, ``OSError`` when taken); returns once up."""
        import uvicorn

        sock = sock if sock is not None else _bind(host, port)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llamaduo-serve", daemon=True)
        thread.start()
        running = cls(server, thread, sock, host)
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                running.stop(timeout)
                raise RuntimeError(f"the server on {host}:{running.port} did not start")
            time.sleep(0.02)
        return running

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit and wait for its thread (at most ``timeout`` seconds)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``).

    ``port`` 0 picks a free port. The server stops when the block exits.
    """
    running = ServerThread.start(app, host, port, timeout=timeout)
    try:
        yield running.url
    finally:
        running.stop(timeout)


class BackgroundServer:
    """An OpenAI-compatible server in a thread of this process whose models are added while it runs.

    The first :meth:`publish` binds ``host:port`` (an ``OSError`` such as "address already in use" when it is
    taken; nothing is loaded then) and starts the server; later ones add models or replace those of the same name.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning") -> None:
        self.host, self.port, self.log_level = host, port, log_level
        self.registry: ModelRegistry | None = None
        self.running: ServerThread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str | None:
        """Base URL (``http://host:port``) once started, else None."""
        return self.running.url if self.running is not None else None

    def publish(
        self, models: Mapping[str, Path | str], defaults: Mapping[str, ModelDefaults] | None = None
    ) -> list[str]:
        """Load ``models`` (name -> folder) and serve them; returns the names that replaced served models.

        Blocking (loads models): call it from a worker thread.
        """
        with self._lock:
            if self.running is not None and self.registry is not None:
                return self.registry.add(ModelRegistry(models, defaults))
            sock = _bind(self.host, self.port)
            try:
                registry = ModelRegistry(models, defaults)
                running = ServerThread.start(
                    create_app({}, registry=registry), self.host, sock=sock, log_level=self.log_level)
            except BaseException:
                sock.close()
                raise
            self.registry, self.running = registry, running
            return []

    def stop(self) -> None:
        """Stop serving (the loaded models are dropped)."""
        with self._lock:
            if self.running is not None:
                self.running.stop()
            self.running = self.registry = None


def fetch_migration_model(
    store: ArtifactStore, migration_id: str, cache: Path, *, model_key: str | None = None
) -> tuple[Path, MigrationSpec]:
    """Download a finished migration's chosen model into ``cache/<migration_id>``; returns it with the spec.

    The chosen model is ``model_key`` when given (the ``migration.completed`` event's ``model``), else the one
    its ``report.json`` names. Raises ``LookupError`` when the migration names no model.
    """
    from llamaduo.storage.keys import migration_key, spec_key

    if not model_key:
        report = store.get_json(migration_key(migration_id, "report.json"))
        if not report.get("model"):
            raise LookupError(f"report of {migration_id} names no model (outcome {report.get('outcome')})")
        model_key = str(report["model"]["key"])
    spec = MigrationSpec.model_validate(store.get_json(spec_key(migration_id)))
    return store.get_dir(model_key, Path(cache) / migration_id), spec


def migration_defaults(spec: MigrationSpec) -> ModelDefaults:
    """A migration's request defaults: its student's inference settings and its task's system prompt."""
    return ModelDefaults(inference=spec.student.inference, system_prompt=spec.task.system_prompt)
