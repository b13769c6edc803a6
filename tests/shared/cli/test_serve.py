"""``llamaduo serve`` with its guard flags, run as a user runs it: keys file, token cap, adapters folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llamaduo.runtime.local_servers import free_port

KEY = "cli-key-4242424242"


def request(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_flags_guard_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamaduo.models.resolve import resolve_base_model

    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMADUO_API_KEYS", raising=False)
    monkeypatch.delenv("LLAMADUO_API_KEYS_FILE", raising=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    model = resolve_base_model("tiny:llama")
    (tmp_path / "keys").write_text(f"{KEY}\n")
    (tmp_path / "adapters").mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaduo.cli", "serve", "--model", f"tiny={model}", "--port", str(port),
         "--api-keys-file", str(tmp_path / "keys"), "--max-total-tokens", "10", "--adapters-dir",
         str(tmp_path / "adapters")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "llamaduo serve did not start"
            try:
                if request(f"{url}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert request(f"{url}/v1/models")[0] == 401
        assert request(f"{url}/v1/models", key=KEY)[1]["data"][0]["id"] == "tiny"
        ask = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        assert request(f"{url}/v1/chat/completions", {**ask, "n": 2}, KEY)[0] == 400  # 12 > --max-total-tokens
        assert request(f"{url}/v1/chat/completions", ask, KEY)[0] == 200
        status, body = request(f"{url}/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/etc"}, KEY)
        assert status == 400 and body["error"]["param"] == "lora_path"  # --adapters-dir: the endpoint is there
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "1 API key(s)" in stderr and KEY not in stderr
