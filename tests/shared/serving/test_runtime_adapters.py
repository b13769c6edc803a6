"""LoRA adapters loaded and unloaded at run time (vLLM's endpoints), with the openai client against a real server:
a PEFT adapter made here on the tiny model (random LoRA weights, nothing trained) is served under a new name next
to its base, from inside the adapters folder only, by admin keys only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from llamaduo.serving.app import create_app
from llamaduo.serving.guard import ServingLimits
from llamaduo.serving.server import serve_in_thread

KEY, ADMIN_KEY = "serve-key-abc", "admin-key-xyz"
MESSAGES = [{"role": "user", "content": "billing refund"}]
MAX_TOKENS = 12


def make_adapter(base: Path, dest: Path, seed: int) -> list[int]:
    """Save a LoRA adapter of ``base`` with random (non-zero) weights in ``dest``; its greedy answer's token ids."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llamaduo.models.generation import cut_at_stop, generate_new_tokens, messages_ids, stop_token_ids
    from llamaduo.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(load_causal_lm(base), config).eval()
    model.save_pretrained(dest)
    tokenizer = load_tokenizer(base)
    stops = stop_token_ids(tokenizer)
    [new] = generate_new_tokens(model, messages_ids(tokenizer, MESSAGES), max_new_tokens=MAX_TOKENS, stop_ids=stops,
                                pad_token_id=tokenizer.pad_token_id)
    return cut_at_stop(new, stops)[0]


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[int]]]:
    root = tmp_path_factory.mktemp("adapters")
    answers = {name: make_adapter(tiny_model, root / name, seed) for name, seed in (("one", 1), ("two", 2))}
    outside = tmp_path_factory.mktemp("elsewhere") / "three"
    make_adapter(tiny_model, outside, 3)
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    return root, answers


@pytest.fixture(scope="module")
def app(tiny_model: Path, adapters: tuple[Path, dict[str, list[int]]]) -> Any:
    limits = ServingLimits(api_keys=(KEY,), admin_api_keys=(ADMIN_KEY,))
    return create_app({"tiny": tiny_model}, limits=limits, adapters_dir=adapters[0])


@pytest.fixture(scope="module")
def base_url(app: Any) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def admin(base_url: str, action: str, body: dict[str, Any], key: str = ADMIN_KEY) -> tuple[int, str]:
    req = urllib.request.Request(f"{base_url}/v1/{action}_lora_adapter", data=json.dumps(body).encode(),
                                 method="POST", headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def answer(client: OpenAI, model: str) -> tuple[str, int]:
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    return resp.choices[0].message.content or "", resp.usage.completion_tokens


def test_load_serve_and_unload_adapters_at_run_time(app: Any, base_url: str, adapters: Any) -> None:
    _, expected = adapters
    client = OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    tokenizer = app.state.registry.get("tiny").tokenizer
    base_answer = answer(client, "tiny")

    assert admin(base_url, "load", {"lora_name": "one", "lora_path": "one"}, key=KEY)[0] == 401  # not an admin key
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, text = admin(base_url, "load", {"lora_name": "one", "lora_path": "one"})
    assert (status, text) == (200, "Success: LoRA adapter 'one' added successfully.")
    status, _ = admin(base_url, "load", {"lora_name": "two", "lora_path": str(adapters[0] / "two")})  # absolute
    assert status == 200
    assert [m.id for m in client.models.list().data] == ["tiny", "one", "two"]
    assert client.models.retrieve("two").id == "two"

    for _ in range(2):  # switching between the adapters and the bare base
        for name in ("one", "two"):
            text, tokens = answer(client, name)
            assert text == tokenizer.decode(expected[name], skip_special_tokens=True).strip()
            assert tokens == len(expected[name])
        assert answer(client, "tiny") == base_answer  # the base answers with the adapters off
    assert len({answer(client, m)[0] for m in ("tiny", "one", "two")}) == 3

    status, text = admin(base_url, "load", {"lora_name": "one", "lora_path": "two"})
    assert status == 400 and "already been loaded" in json.loads(text)["error"]["message"]

    status, text = admin(base_url, "unload", {"lora_name": "one"})
    assert (status, text) == (200, "Success: LoRA adapter 'one' removed successfully.")
    assert [m.id for m in client.models.list().data] == ["tiny", "two"]
    with pytest.raises(openai.NotFoundError):
        answer(client, "one")
    assert answer(client, "tiny") == base_answer
    assert answer(client, "two")[0] == tokenizer.decode(expected["two"], skip_special_tokens=True).strip()
    assert admin(base_url, "unload", {"lora_name": "one"})[0] == 404
    status, text = admin(base_url, "unload", {"lora_name": "tiny"})
    assert status == 400 and "loaded at startup" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("lora_path", ["../elsewhere", "/etc", "sneaky", "missing"])
def test_paths_outside_the_adapters_folder_are_refused(base_url: str, lora_path: str) -> None:
    status, text = admin(base_url, "load", {"lora_name": "evil", "lora_path": lora_path})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "lora_path"
    assert ("outside" if lora_path != "missing" else "not a LoRA adapter") in error["message"]
    assert "/tmp" not in error["message"]  # the server's own folders are not told


def test_bad_bodies_are_400(base_url: str) -> None:
    status, text = admin(base_url, "load", {"lora_name": "x"})
    assert status == 400 and json.loads(text)["error"]["param"] == "lora_path"


def test_without_an_adapters_folder_there_are_no_such_endpoints(tiny_model: Path) -> None:
    with serve_in_thread(create_app({"tiny": tiny_model})) as url:
        assert admin(url, "load", {"lora_name": "one", "lora_path": "one"})[0] == 404
