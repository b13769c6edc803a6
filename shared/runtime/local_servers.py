"""Private servers for the embedded mode and the tests: a real ``nats-server`` (JetStream, loopback) and a
real S3 server (``rclone serve s3``), both from PyPI packages, under a data folder.

Production points the same services at NATS and MinIO by URL instead; nothing else changes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llamaduo.errors import LlamaDuoError


class ServerError(LlamaDuoError, RuntimeError):
    """A private server or service of the embedded installation that cannot start or stopped (names it)."""


def find_binary(name: str) -> str:
    """A binary from the virtual environment (PyPI packages put them next to python), else PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServerError(f"{name} not found: install the project's 'servers' extra (pip install -e '.[servers]')")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ServerError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process stopped with SIGTERM, then SIGKILL."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class NatsServer:
    data_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = (self.data_dir / "nats-server.log").open("ab")
        cmd = [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(self.port),
               "-sd", str(self.data_dir / "jetstream"), *self.extra_args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.process = ManagedProcess("nats-server", proc, self.data_dir / "nats-server.log")
        wait_for_port(self.port, proc, "nats-server")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@dataclass
class S3Server:
    """``rclone serve s3`` over a local folder; keys are generated per run unless given."""

    data_dir: Path
    port: int = 0
    access_key: str = field(default_factory=lambda: "ld" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        root = self.data_dir / "s3"
        root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = (self.data_dir / "s3-server.log").open("ab")
        cmd = [find_binary("rclone"), "serve", "s3", str(root), "--addr", f"127.0.0.1:{self.port}",
               "--auth-key", f"{self.access_key},{self.secret_key}", "--config", os.devnull]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.process = ManagedProcess("s3-server", proc, self.data_dir / "s3-server.log")
        wait_for_port(self.port, proc, "rclone serve s3")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()
