"""The hardened serving core, with the official openai client against a real uvicorn server on the tiny model:
API keys, body limit, token cap, bounded queue, cancellation on disconnect, 500s without exception text."""

from __future__ import annotations

import http.client
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from openai import OpenAI

from llamaduo.serving.app import create_app
from llamaduo.serving.guard import BoundedQueue, ServingLimits
from llamaduo.serving.server import serve_in_thread

KEY, ADMIN_KEY, WRONG_KEY = "serve-key-0123456789", "admin-key-9876543210", "wrong-key-5555555555"
LIMITS = ServingLimits(api_keys=(KEY,), admin_api_keys=(ADMIN_KEY,), max_body_bytes=64 * 1024,
                       max_total_tokens=4000, max_concurrent=1, max_waiting=1, retry_after_s=3)
MESSAGES = [{"role": "user", "content": "hello there"}]
LONG = 1900  # tokens: ~2 s of generation on the tiny model


@pytest.fixture(scope="module")
def app(tiny_model: Path) -> Any:
    return create_app({"tiny": tiny_model}, limits=LIMITS)


@pytest.fixture(scope="module")
def base_url(app: Any) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def client(base_url: str, key: str = KEY, timeout: float = 60) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=timeout)


def raw(base_url: str, method: str, path: str, body: bytes | Any = None, headers: dict[str, str] | None = None,
        ) -> tuple[int, dict[str, str], Any]:
    """``(status, headers, decoded JSON body)`` of a raw request (an iterator body goes chunked)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    chunked = body is not None and not isinstance(body, bytes)
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})},
                 encode_chunked=chunked)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data) if data else None


def test_keys_are_asked_except_on_health(base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError) as err:
        client(base_url, WRONG_KEY).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert set(err.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        client(base_url, WRONG_KEY).models.list()
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _, answer = raw(base_url, "POST", "/v1/chat/completions", body)  # no key at all
    assert status == 401 and answer["error"]["code"] == "invalid_api_key" and "Missing" in answer["error"]["message"]
    assert client(base_url, ADMIN_KEY).models.list().data[0].id == "tiny"  # an admin key serves too
    status, headers, body = raw(base_url, "GET", "/v1/models", headers={"authorization": "Basic " + KEY})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert raw(base_url, "GET", "/health")[0] == 200
    assert WRONG_KEY not in caplog.text and KEY not in caplog.text and "refused" in caplog.text


def test_body_over_the_limit_is_413(base_url: str) -> None:
    big = [{"role": "user", "content": "x" * (70 * 1024)}]
    with pytest.raises(openai.APIStatusError) as err:
        client(base_url).chat.completions.create(model="tiny", messages=big, max_tokens=2)
    assert err.value.status_code == 413 and err.value.code == "request_too_large"
    body = json.dumps({"model": "tiny", "messages": big}).encode()
    pieces = iter([body[i:i + 8192] for i in range(0, len(body), 8192)])  # no content-length: counted as read
    status, _, answer = raw(base_url, "POST", "/v1/chat/completions", pieces, {"authorization": f"Bearer {KEY}"})
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    small = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _, _ = raw(base_url, "POST", "/v1/chat/completions", iter([small[:10], small[10:]]),
                       {"authorization": f"Bearer {KEY}"})
    assert status == 200


def test_max_tokens_times_n_over_the_cap_is_400(base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1000, n=5)
    message = err.value.body["message"]
    assert "max_tokens (1000)" in message and "n (5)" in message and "4000" in message
    assert err.value.param == "max_tokens"
    ok = client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=2)
    assert len(ok.choices) == 2


def _queue(app: Any, base_url: str) -> BoundedQueue:
    client(base_url).models.list()  # starlette builds its middleware stack on the first request
    layer = app.middleware_stack
    while not isinstance(layer, BoundedQueue):
        layer = layer.app
    return layer


def test_overload_is_429_with_retry_after(app: Any, base_url: str) -> None:
    """One running (held on its model's lock), one waiting: the third is refused, the first two are answered."""
    queue = _queue(app, base_url)
    lock = app.state.registry.get("tiny").backend.lock
    ask = client(base_url).chat.completions.create
    with ThreadPoolExecutor(2) as pool:
        with lock:
            first = pool.submit(ask, model="tiny", messages=MESSAGES, max_tokens=2)
            second = pool.submit(ask, model="tiny", messages=MESSAGES, max_tokens=2, stream=True)
            _wait_for_queue(queue, (1, 1), 30)
            with pytest.raises(openai.RateLimitError) as err:
                ask(model="tiny", messages=MESSAGES, max_tokens=2)
            assert err.value.response.headers["retry-after"] == "3" and err.value.code == "server_busy"
            assert client(base_url).models.list().data  # not a generation: not queued
        assert first.result(60).choices[0].message.content is not None
        assert list(second.result(60))
    _wait_for_queue(queue, (0, 0), 10)  # the server leaves the queue just after its last byte reached the client


def _wait_for_queue(queue: BoundedQueue, running_waiting: tuple[int, int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (queue.running, queue.waiting) != running_waiting:
        assert time.monotonic() < deadline, (queue.running, queue.waiting)
        time.sleep(0.02)


def _wait_cancelled(served: Any, before: int) -> None:
    deadline = time.monotonic() + 30
    while served.cancelled == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)


def test_a_client_gone_mid_stream_stops_its_generation(app: Any, base_url: str) -> None:
    served = app.state.registry.get("tiny")
    cancelled, tokens = served.cancelled, served.generated_tokens
    stream = client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=LONG, stream=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    _wait_cancelled(served, cancelled)
    assert served.generated_tokens - tokens < LONG / 2


def test_a_client_gone_before_the_answer_stops_its_generation(app: Any, base_url: str) -> None:
    served = app.state.registry.get("tiny")
    cancelled, tokens = served.cancelled, served.generated_tokens
    with pytest.raises(openai.APITimeoutError):
        client(base_url, timeout=0.5).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=LONG)
    _wait_cancelled(served, cancelled)
    assert served.generated_tokens - tokens < LONG / 2
    # the model goes on answering whole requests
    whole = client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300)
    assert whole.usage.completion_tokens == 300 and whole.choices[0].finish_reason == "length"


def test_a_500_names_an_error_id_not_the_exception(app: Any, base_url: str, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail /srv/internal/path")

    monkeypatch.setattr(app.state.registry.get("tiny"), "generate", broken)
    caplog.set_level(logging.ERROR)
    with pytest.raises(openai.InternalServerError) as err:
        client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    message = err.value.body["message"]
    assert err.value.status_code == 500 and err.value.code == "internal_error"
    assert "secret" not in json.dumps(err.value.body) and "RuntimeError" not in json.dumps(err.value.body)
    error_id = message.split("error id ")[1].split(")")[0]
    [record] = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
    assert error_id in record.getMessage() and "secret detail" in str(record.exc_info[1])

    with pytest.raises(openai.APIError) as err:
        list(client(base_url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, stream=True))
    assert "Internal error (error id err-" in err.value.message and "secret" not in err.value.message
