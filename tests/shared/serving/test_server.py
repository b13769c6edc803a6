"""``llamaduo serve``: two tiny LoRA students on one base, served over HTTP, used with the official openai client."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
import pytest
from openai import OpenAI

from llamaduo.contracts.spec import StudentSpec
from llamaduo.data.examples import Example
from llamaduo.services.inference.domain import StudentGenerator
from llamaduo.services.trainer.domain import train
from llamaduo.serving.app import create_app
from llamaduo.serving.engine import GenerationParams
from llamaduo.serving.registry import ModelRegistry
from llamaduo.serving.server import serve_in_thread
from llamaduo.tasks.triage import make_dataset

SYSTEM = "Route the ticket to one queue."
ROWS = make_dataset(n_train=16, n_test=4)
TRAIN = [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in ROWS
         if r["split"] == "train"]
#: The second student learns a different answer for everything, so the two disagree.
OTHER = [ex.model_copy(update={"response": "refund refund refund"}) for ex in TRAIN]
PROMPTS = [r["instruction"] for r in ROWS if r["split"] == "test"]
MAX_TOKENS = 8


def spec(**inference: object) -> StudentSpec:
    return StudentSpec.model_validate({
        "base_model": "tiny:llama", "method": "lora",
        "training": {"epochs": 4, "learning_rate": 1e-2, "batch_size": 8, "max_length": 128},
        "inference": {"max_new_tokens": MAX_TOKENS, **inference},
    })


def http(method: str, url: str, body: bytes | dict | None = None) -> tuple[int, str, str]:
    """``(status, content type, body text)`` of a raw request (stdlib only)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers["content-type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["content-type"], err.read().decode()


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADUO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        folders = {"triage": tmp_path_factory.mktemp("triage"), "other": tmp_path_factory.mktemp("other")}
        train(spec(), TRAIN, SYSTEM, folders["triage"])
        train(spec(), OTHER, SYSTEM, folders["other"])
        yield folders


@pytest.fixture(scope="module")
def app(students: dict[str, Path]):  # type: ignore[no-untyped-def]
    return create_app(students, spec())


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def test_lists_the_served_models(client: OpenAI, app) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == ["triage", "other"]
    model = client.models.retrieve("other")
    assert model.id == "other" and model.owned_by == "llamaduo"
    # both adapters on one loaded base model
    registry = app.state.registry
    assert len(registry.backends) == 1
    assert registry.get("triage").backend is registry.get("other").backend


def test_completion_matches_the_evaluated_student(client: OpenAI, app, students: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    """Same chat template, same greedy answer and token count as the inference service's StudentGenerator."""
    generator = StudentGenerator.load(spec(), students["triage"])
    expected_ids = generator.generate_tokens(PROMPTS, SYSTEM)
    tokenizer = app.state.registry.get("triage").tokenizer
    for prompt, [ids] in zip(PROMPTS, expected_ids, strict=True):
        resp = client.chat.completions.create(model="triage", messages=chat(prompt), temperature=0)
        assert resp.object == "chat.completion" and resp.model == "triage" and len(resp.choices) == 1
        choice = resp.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert choice.finish_reason == ("length" if len(ids) == MAX_TOKENS else "stop")
        usage = resp.usage
        assert usage is not None and usage.completion_tokens == len(ids)
        prompt_text = tokenizer.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
        assert usage.prompt_tokens == len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", ["triage", "other"])
def test_stream_assembles_the_same_answer(client: OpenAI, model: str) -> None:
    for prompt in PROMPTS[:2]:
        whole = client.chat.completions.create(model=model, messages=chat(prompt), temperature=0)
        chunks = list(client.chat.completions.create(
            model=model, messages=chat(prompt), temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
        if model == "other":  # a long answer comes in several pieces
            assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1


def test_stream_without_usage_ends_with_done(base_url: str) -> None:
    body = {"model": "other", "messages": chat(PROMPTS[0]), "stream": True, "max_tokens": 3}
    status, content_type, text = http("POST", f"{base_url}/v1/chat/completions", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    lines = [line for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and '"usage"' not in "".join(lines)


def test_two_students_side_by_side(client: OpenAI) -> None:
    answers = {
        name: [client.chat.completions.create(model=name, messages=chat(p), temperature=0).choices[0].message.content
               for p in PROMPTS]
        for name in ("triage", "other", "triage")  # switching back and forth between adapters
    }
    assert answers["other"] != answers["triage"]
    assert all("refund" in a for a in answers["other"])  # what the second student learned


def test_max_tokens_n_seed_and_stop(client: OpenAI) -> None:
    short = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    one = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), temperature=0)
    assert one.usage.completion_tokens == MAX_TOKENS  # the spec's max_new_tokens is the default max_tokens

    greedy = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), n=3, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens

    hot = dict(model="triage", messages=chat(PROMPTS[0]), n=4, temperature=5.0, seed=7)
    first, again = client.chat.completions.create(**hot), client.chat.completions.create(**hot)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1

    full = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), temperature=0)
    text = full.choices[0].message.content
    assert text.startswith("refund")
    cut = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), temperature=0, stop=["fun"])
    assert cut.choices[0].message.content == "re" and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.chat.completions.create(model="other", messages=chat(PROMPTS[0]), temperature=0, stop="fun",
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "re"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=chat("hi"))
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert err.value.type == "invalid_request_error" and "gpt-4o" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_bad_requests_are_400(client: OpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="triage", messages=[])
    assert err.value.status_code == 400
    assert err.value.type == "invalid_request_error" and err.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="triage", messages=chat("hi"), temperature=-1)
    assert err.value.param == "temperature"

    url = f"{base_url}/v1/chat/completions"
    for content, param in [
        (b"{not json", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "triage", "messages": [{"role": "tool", "content": "hi"}]}', "messages[0].role"),
        (b'{"model": "triage", "messages": [{"content": "hi"}]}', "messages[0].role"),
        (b"[1, 2]", None),
    ]:
        status, _, text = http("POST", url, content)
        assert status == 400, content
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]

    too_long = {"model": "triage", "messages": chat("billing " * 2100), "stream": True}
    status, _, text = http("POST", url, too_long)
    assert status == 400 and json.loads(text)["error"]["code"] == "context_length_exceeded"

    status, _, text = http("GET", f"{base_url}/v1/nothing-here")
    assert status == 404 and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_get_their_own_adapter(client: OpenAI) -> None:
    def ask(name: str) -> tuple[str, str]:
        resp = client.chat.completions.create(model=name, messages=chat(PROMPTS[1]), temperature=0)
        return name, resp.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, ["triage", "other"] * 6))
    assert len({a for n, a in answers if n == "triage"}) == 1 and len({a for n, a in answers if n == "other"}) == 1
    assert {a for n, a in answers if n == "triage"} != {a for n, a in answers if n == "other"}


def test_generation_does_not_block_the_server(client: OpenAI, app, base_url: str) -> None:  # type: ignore[no-untyped-def]
    """A request waiting for its model (held here by taking its lock) leaves the event loop free."""
    lock = app.state.registry.backends[0].lock
    with ThreadPoolExecutor(1) as pool:
        with lock:
            pending = pool.submit(client.chat.completions.create, model="triage", messages=chat("hi"))
            for _ in range(3):
                assert http("GET", f"{base_url}/v1/models")[0] == 200
            assert not pending.done()
        assert pending.result(timeout=60).choices[0].message.content is not None


def test_a_lone_adapter_is_merged_and_answers_the_same(students: dict[str, Path], app) -> None:  # type: ignore[no-untyped-def]
    alone = ModelRegistry({"other": students["other"]}).get("other")
    shared = app.state.registry.get("other")
    assert alone.adapter is None and alone.backend.adapters == [] and shared.adapter is not None
    params = GenerationParams(max_tokens=MAX_TOKENS)
    for prompt in PROMPTS[:2]:
        messages = chat(prompt)
        assert alone.prompt_ids(messages) == shared.prompt_ids(messages)
        [a] = alone.generate(alone.prompt_ids(messages), params)
        [b] = shared.generate(shared.prompt_ids(messages), params)
        assert a == b
