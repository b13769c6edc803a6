"""LoRA adapters loaded and unloaded while serving, with vLLM's endpoints and bodies.

* ``POST /v1/load_lora_adapter`` ``{"lora_name": NAME, "lora_path": FOLDER}``: loads the adapter folder (a PEFT
  adapter, or a trained LoRA student) onto the already loaded base it was trained on, served as ``NAME``;
  200 ``Success: LoRA adapter 'NAME' added successfully.`` (plain text, as vLLM answers).
* ``POST /v1/unload_lora_adapter`` ``{"lora_name": NAME}``: removes an adapter loaded that way.

The routes exist only when the app is given an adapters root (``llamaduo serve --adapters-dir``): ``lora_path``
(relative to it, or absolute) must lie inside it once resolved (symbolic links followed), so a request never
names an arbitrary path. Who may call them is the guard's business (admin keys, else the serving keys: see
:mod:`~llamaduo.serving.guard`). The adapter's base is the folder its ``llamaduo_student.json`` or
``adapter_config.json`` names; it must be one the registry has loaded (not a merged student).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaduo.serving.api import APIError
from llamaduo.serving.engine import Backend, ServedModel
from llamaduo.serving.registry import ModelRegistry

log = logging.getLogger(__name__)

#: One load or unload at a time (a name is checked then taken).
_changes = threading.Lock()


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body (fields this server does not use are allowed)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def adapter_folder(root: Path, lora_path: str) -> Path:
    """``lora_path`` resolved inside ``root``; a 400 :class:`APIError` when it points outside or is no adapter."""
    root = root.expanduser().resolve()
    folder = (root / Path(lora_path).expanduser()).resolve()
    if not folder.is_relative_to(root):
        raise APIError(400, f"lora_path {lora_path!r} is outside the adapters folder this server loads from; "
                       "give a folder inside it (relative to it, or absolute)", param="lora_path")
    if not (folder / "adapter_config.json").is_file():
        raise APIError(400, f"lora_path {lora_path!r} is not a LoRA adapter folder (no adapter_config.json)",
                       param="lora_path")
    return folder


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on: its student metadata's base, else PEFT's
    ``base_model_name_or_path``."""
    from llamaduo.models.loading import STUDENT_META_FILE, read_student_meta, student_base_path

    if (folder / STUDENT_META_FILE).is_file():
        return str(student_base_path(read_student_meta(folder)))
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path") or "")


def _base_backend(registry: ModelRegistry, base: str) -> tuple[Backend, ServedModel]:
    path = Path(base).expanduser()
    wanted = path.resolve() if path.is_dir() else None
    for served in registry:
        backend = served.backend
        if wanted is not None and backend.base_path is not None and backend.base_path.resolve() == wanted:
            return backend, served
    loaded = sorted({s.name for s in registry if s.backend.base_path is not None})
    raise APIError(400, f"the adapter's base model ({Path(base).name or '?'}) is not loaded here; it can go on "
                   f"the base of: {', '.join(loaded) or '(none)'}", param="lora_path")


def load_adapter(registry: ModelRegistry, name: str, folder: Path) -> ServedModel:
    """Load the adapter ``folder`` onto its loaded base and serve it as ``name`` (blocking: a worker thread)."""
    with _changes:
        return _load_adapter(registry, name, folder)


def _load_adapter(registry: ModelRegistry, name: str, folder: Path) -> ServedModel:
    from peft import PeftModel

    from llamaduo.models.loading import load_tokenizer

    if name in registry.models:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    backend, base_served = _base_backend(registry, adapter_base(folder))
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else base_served.tokenizer
    adapter = f"runtime_{uuid.uuid4().hex[:12]}"
    with backend.lock:
        if isinstance(backend.model, PeftModel):
            backend.model.load_adapter(str(folder), adapter_name=adapter)
        else:  # a whole model gets its first adapter: the other names on it answer with adapters disabled
            backend.model = PeftModel.from_pretrained(backend.model, str(folder), adapter_name=adapter).eval()
            backend.active = adapter
        backend.adapters.append(adapter)
        backend.runtime_adapters.add(adapter)
    served = ServedModel(name, folder, tokenizer, backend, adapter=adapter, method="lora",
                         base_model=base_served.base_model or base_served.name)
    registry.models = {**registry.models, name: served}
    log.info("loaded LoRA adapter %r onto the base of %r", name, base_served.name)
    return served


def unload_adapter(registry: ModelRegistry, name: str) -> None:
    """Stop serving ``name``, an adapter loaded at run time, and free it (blocking: a worker thread)."""
    with _changes:
        _unload_adapter(registry, name)


def _unload_adapter(registry: ModelRegistry, name: str) -> None:
    served = registry.models.get(name)
    if served is None:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found")
    backend = served.backend
    if served.adapter is None or served.adapter not in backend.runtime_adapters:
        raise APIError(400, f"The model {name!r} was loaded at startup; only adapters loaded with "
                       "/v1/load_lora_adapter can be unloaded", param="lora_name")
    registry.models = {k: v for k, v in registry.models.items() if k != name}  # new requests: 404 from now
    with backend.lock:  # running requests on it finish first
        backend.model.delete_adapter(served.adapter)
        backend.adapters.remove(served.adapter)
        backend.runtime_adapters.discard(served.adapter)
        if backend.active == served.adapter:
            backend.active = None
    log.info("unloaded LoRA adapter %r", name)


async def _body(request: Any, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(json.loads(await request.body()))
    except ValueError as err:  # bad JSON or a bad field (ValidationError is a ValueError)
        where = ".".join(str(p) for p in err.errors()[0]["loc"]) if isinstance(err, ValidationError) else None
        raise APIError(400, f"Invalid request: {where or 'the body'} must be as vLLM's {model.__name__} "
                       "(lora_name, lora_path)", param=where) from None


def adapter_routes(registry: ModelRegistry, root: Path) -> list[Any]:
    """Starlette routes of the two endpoints, loading from inside ``root``."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def load(request: Request) -> Response:
        body: LoadLoraAdapterRequest = await _body(request, LoadLoraAdapterRequest)
        folder = adapter_folder(root, body.lora_path)
        await asyncio.to_thread(load_adapter, registry, body.lora_name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(request: Request) -> Response:
        body: UnloadLoraAdapterRequest = await _body(request, UnloadLoraAdapterRequest)
        await asyncio.to_thread(unload_adapter, registry, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return [
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
    ]
