"""The embedded installation: private NATS + S3 servers and the five services as OS processes.

The services are the same ``llamaduo service NAME`` processes production runs; only the URLs differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llamaduo.runtime.local_servers import ManagedProcess, NatsCluster, NatsServer, S3Server
from llamaduo.runtime.service import MIGRATION_SERVICES
from llamaduo.settings import Settings


@dataclass
class Embedded:
    """Start with :meth:`start` (or ``with``); :meth:`stop` stops services first, then the servers."""

    data_dir: Path
    services: tuple[str, ...] = MIGRATION_SERVICES
    replicas: dict[str, int] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: NATS nodes: 1 = one nats-server; more = a JetStream cluster of that many nodes on loopback, the stream and
    #: every bucket replicated on all of them
    nats_nodes: int = 1
    nats: NatsServer | None = None
    cluster: NatsCluster | None = None
    s3: S3Server | None = None
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self) -> Embedded:
        self.data_dir = self.data_dir.resolve()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if self.nats_nodes > 1:
                self.cluster = NatsCluster(self.data_dir / "nats", size=self.nats_nodes).start()
            else:
                self.nats = NatsServer(self.data_dir / "nats").start()
            self.s3 = S3Server(self.data_dir / "s3").start()
            for name in self.services:
                for i in range(self.replicas.get(name, 1)):
                    self.start_service(name, i)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def settings(self) -> Settings:
        nats = self.cluster or self.nats
        assert nats and self.s3, "start() first"
        return Settings(
            nats_url=nats.url, nats_replicas=self.nats_nodes, s3_endpoint=self.s3.endpoint,
            s3_access_key=self.s3.access_key, s3_secret_key=self.s3.secret_key, work_dir=self.data_dir / "work",
        )

    def env(self) -> dict[str, str]:
        """The services' environment: the caller's, less its ``LLAMADUO_*`` installation (this one's instead).

        The user's Hugging Face settings pass through unchanged (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``,
        ``HF_ENDPOINT``): offline only when ``HF_HUB_OFFLINE`` is set by the user (``make demo``/``make test``
        set it), so a hub ``base_model`` not yet cached is downloaded (``llamaduo pull`` does it beforehand).
        """
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMADUO_") or k == "LLAMADUO_CACHE_DIR"}
        env.update({
            "LLAMADUO_NATS_URL": s.nats_url, "LLAMADUO_NATS_REPLICAS": str(s.nats_replicas),
            "LLAMADUO_S3_ENDPOINT": s.s3_endpoint,
            "LLAMADUO_S3_ACCESS_KEY": s.s3_access_key.get_secret_value(),
            "LLAMADUO_S3_SECRET_KEY": s.s3_secret_key.get_secret_value(),
            "LLAMADUO_WORK_DIR": str(s.work_dir), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start_service(self, name: str, index: int = 0) -> ManagedProcess:
        log_path = self.data_dir / "logs" / f"{name}-{index}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "service", name], env=self.env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        managed = ManagedProcess(f"{name}-{index}", proc, log_path)
        self.processes.append(managed)
        return managed

    def service(self, name: str) -> list[ManagedProcess]:
        return [p for p in self.processes if p.name.rsplit("-", 1)[0] == name and p.proc.poll() is None]

    def stop(self) -> None:
        for p in self.processes:
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in self.processes:
            p.stop(timeout=20)
        if self.s3:
            self.s3.stop()
        if self.nats:
            self.nats.stop()
        if self.cluster:
            self.cluster.stop()

    def __enter__(self) -> Embedded:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
