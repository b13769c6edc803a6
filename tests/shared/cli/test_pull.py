"""``llamaduo pull``: built-in models are built offline; Hugging Face ids go to the hub cache the services read,
and every failure names the model and the fix. The Hub is a local HTTP server speaking its protocol
(``HF_ENDPOINT``), since the real one cannot be reached here."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llamaduo.cli.main import main
from llamaduo.models.resolve import HUB_ALLOW_PATTERNS

REPO = "llamaduo-test/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 4096, "README.md": b"# card"}


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints ``snapshot_download`` calls: revision info, the file tree, file downloads.

    ``GATED`` (a class attribute) answers every repository call as a gated repository would without a token.
    """

    gated = False

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if self.gated:
            self.reply(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        elif path == f"/api/models/{REPO}/revision/main":
            siblings = [{"rfilename": name} for name in FILES]
            self.reply(200, json.dumps({"id": REPO, "sha": COMMIT, "siblings": siblings}).encode())
        elif path.startswith(f"/api/models/{REPO}/tree/{COMMIT}"):
            tree = [{"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                    for name, body in FILES.items()]
            self.reply(200, json.dumps(tree).encode())
        elif path.startswith(f"/{REPO}/resolve/") and path.rsplit("/", 1)[-1] in FILES:
            body = FILES[path.rsplit("/", 1)[-1]]
            self.reply(200, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
        else:
            self.reply(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})


@pytest.fixture
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    FakeHub.gated = False


def pull(model: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``llamaduo pull MODEL`` as a user runs it: its own process, the Hugging Face cache under ``tmp_path``."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    variables.update(HF_HOME=str(tmp_path / "hf"), LLAMADUO_CACHE_DIR=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, "-m", "llamaduo.cli", "pull", model], env=variables,
                          capture_output=True, text=True, timeout=120)


def test_tiny_model_is_built_offline_into_the_llamaduo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["pull", "tiny:llama-wide"]) == 0
    line = capsys.readouterr().out.strip()
    name, rest = line.split(": ", 1)
    folder = Path(rest.rsplit(" (", 1)[0])
    assert name == "tiny:llama-wide" and folder.parent == tmp_path / "cache" / "models"
    assert (folder / "config.json").is_file()
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    assert rest.endswith(f"({size_mb:.1f} MB)")


@pytest.mark.slow
def test_smollm2_is_built_offline_from_its_package(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the real LlamaDuo cache (the conversion takes ~25 s once; other tests share it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["pull", "smollm2-135m"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smollm2-135m: ") and line.endswith("MB)")
    assert (Path(line.split(": ", 1)[1].rsplit(" (", 1)[0]) / "model.safetensors").is_file()


def test_hub_model_offline_and_not_cached_names_the_model_and_the_fix(tmp_path: Path) -> None:
    done = pull("someone/not-cached-model", tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2, done.stderr
    assert "someone/not-cached-model" in done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stderr and "llamaduo pull someone/not-cached-model" in done.stderr


def test_hub_model_is_downloaded_into_the_hub_cache_with_the_trainers_patterns(tmp_path: Path, hub: str) -> None:
    done = pull(REPO, tmp_path, HF_ENDPOINT=hub)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().split(": ", 1)[1].rsplit(" (", 1)[0])
    assert folder == tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no README.md
    assert "*.safetensors" in HUB_ALLOW_PATTERNS
    assert done.stdout.strip().endswith("(4.1 kB)")
    # the services, offline, now find it in the same cache
    again = pull(REPO, tmp_path, HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr


def test_gated_unknown_and_unreachable_hub_models_say_what_to_do(tmp_path: Path, hub: str) -> None:
    FakeHub.gated = True
    gated = pull(REPO, tmp_path, HF_ENDPOINT=hub)
    assert gated.returncode == 2 and REPO in gated.stderr and "set HF_TOKEN" in gated.stderr, gated.stderr
    FakeHub.gated = False
    unknown = pull("someone/no-such-model", tmp_path, HF_ENDPOINT=hub)
    assert unknown.returncode == 2 and "no such repository" in unknown.stderr, unknown.stderr
    closed = hub.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens
    unreachable = pull(REPO, tmp_path, HF_ENDPOINT=closed)
    assert unreachable.returncode == 2 and "could not be reached" in unreachable.stderr, unreachable.stderr
