"""The CLI against a running installation: status, events, report; and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llamaduo.runtime.embedded import Embedded
from llamaduo.tasks.triage import make_dataset


def cli(env: Embedded, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaduo.cli", *args], env=env.env(), capture_output=True,
                          text=True, timeout=timeout)


def interruptible() -> None:
    """Run in the child before exec: Ctrl-C acts even when this suite runs as a background job (which starts its
    children with SIGINT ignored, and a Python started so keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_spec(tmp_path: Path) -> Path:
    data = tmp_path / "triage.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_dataset(n_train=8, n_test=4, seed=3)))
    spec = {"task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
            "dataset": {"source": str(data)},
            "student": {"base_model": "tiny:llama", "method": "full"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_status_and_events_show_a_running_migration(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    # only the controller runs: the migration waits in the training stage, as with a busy trainer
    with Embedded(tmp_path / "install", services=("controller",)) as env:
        started = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "migrate", str(spec), "--id", "m-view"],
                                   env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=interruptible)
        try:
            for _ in range(100):
                status = cli(env, "status", "--json")
                rows = json.loads(status.stdout or "[]") if status.returncode == 0 else []
                if rows:
                    break
                time.sleep(0.3)
            assert [{k: v for k, v in r.items() if k != "rounds"} for r in rows] == [
                {"migration_id": "m-view", "stage": "training", "outcome": None, "round": 0}]
            assert rows[0]["rounds"][0]["decision"] is None and rows[0]["rounds"][0]["round"] == 0
            human = cli(env, "status")
            assert "m-view: training (round 0)" in human.stdout
            assert "round 0:" in cli(env, "status", "m-view").stdout  # with an id: its rounds
            events = cli(env, "events", "--json")
            types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
            assert types[:3] == ["migration.start", "migration.progress", "train.request"]
        finally:
            started.send_signal(signal.SIGINT)
            started.wait(60)  # a loaded 2-core machine needs more than a few seconds to close connections


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_embedded_installation_cleanly(tmp_path: Path, sig: int) -> None:
    spec = write_spec(tmp_path)
    data_dir = tmp_path / "install"
    proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "migrate", str(spec), "--embedded",
                             "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    seen = ""
    while "training" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    assert "training" in seen, seen
    assert _processes_mentioning(str(data_dir)), "the installation should be running"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    time.sleep(0.5)
    assert _processes_mentioning(str(data_dir)) == [], "servers and services must all be stopped"


def test_report_of_unknown_migration_names_it(local_servers, tmp_path: Path) -> None:
    env = dict(os.environ, LLAMADUO_NATS_URL=local_servers.nats_url, LLAMADUO_S3_ENDPOINT=local_servers.s3_endpoint,
               LLAMADUO_S3_ACCESS_KEY=local_servers.access_key, LLAMADUO_S3_SECRET_KEY=local_servers.secret_key)
    out = subprocess.run([sys.executable, "-m", "llamaduo.cli", "report", "m-nothing", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "m-nothing" in out.stderr
