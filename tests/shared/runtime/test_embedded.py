"""The embedded installation: private NATS and S3 servers plus service processes, stopped in order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from llamaduo.bus.connection import connect
from llamaduo.runtime import embedded as embedded_module
from llamaduo.runtime.embedded import Embedded
from llamaduo.runtime.local_servers import NatsServer, S3Server, ServerError
from llamaduo.storage.store import ArtifactStore


async def nats_answers(env: Embedded) -> bool:
    nc = await connect(env.settings)
    await nc.flush(timeout=5)
    await nc.close()
    return True


def test_servers_only_reachable_and_env_points_services_at_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_NATS_URL", "nats://somewhere-else:4222")
    monkeypatch.setenv("LLAMADUO_CACHE_DIR", str(tmp_path / "cache"))
    with Embedded(tmp_path / "data", services=()) as env:
        assert asyncio.run(nats_answers(env))
        ArtifactStore(env.settings).ensure_bucket()
        variables = env.env()
        assert variables["LLAMADUO_NATS_URL"] == env.nats.url != "nats://somewhere-else:4222"
        assert variables["LLAMADUO_S3_ENDPOINT"] == env.s3.endpoint
        assert variables["LLAMADUO_CACHE_DIR"] == str(tmp_path / "cache")
        nats, s3 = env.nats.process.proc, env.s3.process.proc
    assert nats.poll() is not None and s3.poll() is not None


def unstarted(tmp_path: Path) -> Embedded:
    """An installation whose servers are only described (ports given): enough for its services' environment."""
    return Embedded(tmp_path, services=(), nats=NatsServer(tmp_path / "nats", port=4222),
                    s3=S3Server(tmp_path / "s3", port=9000))


def test_services_get_the_users_hugging_face_settings_and_are_offline_only_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    variables = unstarted(tmp_path).env()
    assert "HF_HUB_OFFLINE" not in variables  # a hub base_model not yet cached can be downloaded
    assert variables["HF_HOME"] == str(tmp_path / "hf-home")
    assert variables["HF_HUB_CACHE"] == str(tmp_path / "hf-hub")
    assert variables["HF_TOKEN"] == "hf_not_a_real_token"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert unstarted(tmp_path).env()["HF_HUB_OFFLINE"] == "1"


def test_replicas_run_as_processes_and_stop_with_the_installation(tmp_path: Path) -> None:
    env = Embedded(tmp_path / "data", services=("judge",), replicas={"judge": 2}).start()
    try:
        judges = env.service("judge")
        assert [p.name for p in judges] == ["judge-0", "judge-1"]
        judges[0].kill()
        assert [p.name for p in env.service("judge")] == ["judge-1"]
        deadline = time.monotonic() + 60
        while b"service started" not in judges[1].log_path.read_bytes():
            assert time.monotonic() < deadline, judges[1].log_path.read_text()
            time.sleep(0.1)
    finally:
        env.stop()
    assert all(p.proc.poll() is not None for p in env.processes)
    assert env.nats.process.proc.poll() is not None


def test_a_failed_start_stops_what_already_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: S3Server) -> S3Server:
        raise ServerError("rclone serve s3 did not listen")

    monkeypatch.setattr(embedded_module.S3Server, "start", broken)
    env = Embedded(tmp_path / "data", services=())
    with pytest.raises(ServerError, match="did not listen"):
        env.start()
    assert env.nats is not None and env.nats.process.proc.poll() is not None
