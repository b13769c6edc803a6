"""The generation side of the server: a served model, its request settings and how an answer is generated.

Prompts go through the model's chat template exactly as in training and evaluation; answers are the generated
tokens up to the first stop token, decoded and stripped (the same text ``StudentGenerator.generate`` gives).
``completion_tokens`` counts those generated tokens, not the stop token. One request at a time runs per loaded
model (:class:`Backend`'s lock); LoRA students sharing a base switch adapters under that lock, and a whole
model that got adapters at run time answers with them disabled. A set ``cancel`` event (the client went away)
stops a generation at its next token; :class:`ServedModel` counts generated tokens and cancelled generations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaduo.contracts.spec import InferenceSpec
from llamaduo.models.generation import cut_at_stop, generate_new_tokens, messages_ids, stop_token_ids
from llamaduo.serving.api import APIError

#: ``owned_by`` of every served model.
OWNER = "llamaduo"


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
        """Whether this request decodes greedily (temperature 0)."""
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
    """Per-model request defaults; a ``None`` field falls back to the app's (see
    :func:`~llamaduo.serving.app.create_app`)."""

    inference: InferenceSpec | None = None
    system_prompt: str | None = None


class Backend:
    """One loaded torch model (a base with its adapters, or a whole model) and the lock serializing its use.

    ``base_path``: the folder of the unchanged weights adapters can go on (None for a merged student);
    ``runtime_adapters``: the adapters loaded at run time (:mod:`~llamaduo.serving.adapters`).
    """

    def __init__(self, model: Any, adapters: list[str] | None = None, *, base_path: Path | None = None) -> None:
        self.model = model
        self.adapters = adapters or []
        self.active: str | None = self.adapters[0] if self.adapters else None
        self.base_path = base_path
        self.runtime_adapters: set[str] = set()
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
        text = self.tokenizer.decode(cut_at_stop(ids, self.stop_ids)[0], skip_special_tokens=True).lstrip()
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


class ServedModel:
    """One model as clients see it: a name, a tokenizer with its chat template, a (shared) loaded model."""

    def __init__(
        self,
        name: str,
        path: Path,
        tokenizer: Any,
        backend: Backend,
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
        #: tokens generated by this model so far, and generations stopped by ``cancel`` (both for tests/metrics)
        self.generated_tokens = 0
        self.cancelled = 0

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
        return messages_ids(self.tokenizer, messages)

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
            if self.adapter is not None and self.adapter not in backend.adapters:  # unloaded meanwhile
                raise APIError(404, f"The model {self.name!r} was unloaded", param="model", code="model_not_found")
            if self.adapter is not None and backend.active != self.adapter:
                backend.model.set_adapter(self.adapter)
                backend.active = self.adapter
            # a whole model given adapters at run time answers as itself: adapters off
            plain = backend.model.disable_adapter() if self.adapter is None and backend.adapters else nullcontext()
            if not params.greedy and params.seed is not None:
                torch.manual_seed(params.seed)
            results: list[Generation] = []
            with plain:
                for index in range(1 if params.greedy else n):
                    targets = list(range(n)) if params.greedy else [index]

                    def emit(delta: str, targets: list[int] = targets) -> None:
                        for i in targets:
                            on_delta(i, delta)  # type: ignore[misc]

                    if cancel is not None and cancel.is_set():
                        break
                    results.append(self._generate_one(prompt_ids, params, max_new, emit if on_delta else None,
                                                      cancel))
            if cancel is not None and cancel.is_set():
                self.cancelled += 1
        return results * n if params.greedy else results

    def _generate_one(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        max_new: int,
        on_delta: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> Generation:
        answer = _Answer(self.tokenizer, self.stop_ids, params.stop, on_delta)
        plen = len(prompt_ids)

        def should_stop(input_ids: Any) -> bool:
            if cancel is not None and cancel.is_set():
                return True
            return bool(params.stop) and answer.text(input_ids[0, plen:].tolist())[1]

        (new,) = generate_new_tokens(
            self.backend.model, prompt_ids, max_new_tokens=max_new, stop_ids=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id, temperature=params.temperature, top_p=params.top_p,
            streamer=answer, should_stop=should_stop,
        )  # fmt: skip
        self.generated_tokens += len(new)
        ids, stopped = cut_at_stop(new, self.stop_ids)
        text, hit = answer.finish(ids)
        finish = "stop" if stopped or hit or len(ids) < max_new else "length"
        return Generation(text, plen, len(ids), finish, tuple(ids))
