"""One service process: found by entry point, started against real servers, stopped cleanly by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamaduo.bus.connection import connect
from llamaduo.runtime import service
from llamaduo.runtime.service import SERVICES, registrar
from llamaduo.settings import Settings


def test_registrar_finds_each_service_by_entry_point() -> None:
    for name in SERVICES:
        register = registrar(name)
        assert register.__module__ == f"llamaduo.services.{name}.app"


def test_preloaded_libraries_exist_and_a_missing_one_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    import importlib.util

    for name, modules in service.PRELOAD.items():
        assert name in SERVICES
        assert all(importlib.util.find_spec(m) is not None for m in modules), modules
    with caplog.at_level("WARNING", logger="llamaduo.runtime.service"):
        service.import_modules(("json", "llamaduo_no_such_module"))
    assert [r.library for r in caplog.records if r.msg == "preload failed"] == ["llamaduo_no_such_module"]


def test_unknown_service_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown service 'judges'; choose one of controller, trainer, inference"):
        registrar("judges")


def test_a_service_without_entry_point_says_to_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "entry_points", lambda **kwargs: [])
    with pytest.raises(LookupError, match=r"service 'judge' is not installed.*pip install -e"):
        registrar("judge")


def service_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    import os

    return {**os.environ, "LLAMADUO_NATS_URL": settings.nats_url, "LLAMADUO_S3_ENDPOINT": settings.s3_endpoint,
            "LLAMADUO_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
            "LLAMADUO_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
            "LLAMADUO_SUBJECT_PREFIX": settings.subject_prefix, "LLAMADUO_WORK_DIR": str(tmp_path / "work")}


async def consumer_exists(settings: Settings, durable: str) -> bool:
    nc = await connect(settings)
    try:
        await nc.jetstream().consumer_info(settings.stream_name, f"{settings.stream_name}_{durable}")
        return True
    except Exception:
        return False
    finally:
        await nc.close()


def test_service_process_registers_its_consumer_and_stops_on_sigterm(settings: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "judge.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "service", "judge"],
                                env=service_env(settings, tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"service started" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the judge did not start within 60 s"
            time.sleep(0.1)
        assert asyncio.run(consumer_exists(settings, "judge"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines if entry.get("service") == "judge"]
    assert "service started" in messages and "stopping: finishing or returning in-flight work" in messages
    assert settings.s3_secret_key.get_secret_value() not in log_path.read_text()
