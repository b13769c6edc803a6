"""The production files (Dockerfile, docker-compose.yml) against the code and the registries of late 2026: every
image pinned to a version from a repository that still exists, compose internally consistent, its settings names
those of ``llamaduo.settings``, the Hugging Face cache on a volume and never forced offline.

``docker compose config`` checks the file where Docker Compose is installed; the rest needs no Docker.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamaduo.runtime.local_servers import seaweedfs_identities
from llamaduo.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: Repositories that no longer serve images (MinIO's Docker Hub repository was deleted on 2026-09-12).
DELETED_REPOSITORIES = ("minio/minio", "minio/mc")
#: ``LLAMADUO_*`` variables read outside ``Settings`` (llamaduo.models.resolve.cache_dir).
OTHER_LLAMADUO_VARIABLES = {"LLAMADUO_CACHE_DIR"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` with ``values`` as the environment."""
    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in values:
            return values[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)


def image_references() -> list[tuple[str, str]]:
    """``(where, image)`` for every image the repository names: compose, Dockerfile FROM, testcontainers."""
    refs = [(f"compose service {name}", svc["image"]) for name, svc in compose()["services"].items() if "image" in svc]
    refs.append(("compose x-service", compose()["x-service"]["image"]))
    refs += [("Dockerfile", line.split()[1]) for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM")]
    import conftest

    refs += [("tests/conftest.py", conftest.NATS_IMAGE), ("tests/conftest.py", conftest.SEAWEEDFS_IMAGE)]
    return refs


def test_every_image_is_pinned_to_a_version_of_a_repository_that_exists() -> None:
    refs = image_references()
    assert len(refs) >= 6
    for where, image in refs:
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", f"{where}: {image} is not pinned"
        assert repository not in DELETED_REPOSITORIES, f"{where}: {image} is from a deleted repository"


def test_no_file_names_a_latest_image_or_a_deleted_repository() -> None:
    """Docs and tests included: a copied command must pull."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    latest = re.compile(r"\b[\w.\-/]+:" + "latest" + r"\b")
    deleted = re.compile(r"(?<![\w.\-/])(" + "|".join(map(re.escape, DELETED_REPOSITORIES)) + r")\b")
    found = []
    for name in files:
        path = ROOT / name
        if path == Path(__file__).resolve():  # names them to forbid them
            continue
        if path.suffix not in {".py", ".md", ".yml", ".yaml", ".toml", ".txt", ""} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if latest.search(line) or deleted.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_compose_references_only_what_it_declares() -> None:
    spec = compose()
    services, volumes, configs = spec["services"], set(spec["volumes"]), set(spec.get("configs", {}))
    used_volumes: set[str] = set()
    for name, svc in services.items():
        for target, condition in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on undeclared {target}"
            if services[target].get("profiles"):  # not started by default: a plain `up` must not wait for it
                assert condition.get("required") is False, f"{name} requires {target}, which only a profile starts"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
                used_volumes.add(source)
        for config in svc.get("configs", []):
            assert config["source"] in configs, f"{name} uses undeclared config {config['source']}"
    assert used_volumes == volumes, f"declared but unused volumes: {volumes - used_volumes}"
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert {"nats", "seaweedfs", "controller", "trainer", "inference", "judge", "synthesizer"} <= default
    assert services["minio"]["profiles"] == ["minio"]


def test_compose_and_dockerfile_settings_are_those_of_the_code() -> None:
    known = {f"LLAMADUO_{field.upper()}" for field in Settings.model_fields} | OTHER_LLAMADUO_VARIABLES
    import inspect

    from llamaduo.models import resolve

    assert "LLAMADUO_CACHE_DIR" in inspect.getsource(resolve.cache_dir)
    named = set(re.findall(r"\bLLAMADUO_[A-Z_]+\b", COMPOSE.read_text() + DOCKERFILE.read_text()))
    assert named and named <= known, f"not read by the code: {named - known}"
    env = compose()["x-service"]["environment"]
    assert {"LLAMADUO_NATS_URL", "LLAMADUO_S3_ENDPOINT", "LLAMADUO_S3_ACCESS_KEY", "LLAMADUO_S3_SECRET_KEY"} <= set(env)


def test_seaweedfs_gets_the_identity_the_services_use() -> None:
    spec = compose()
    values = {"S3_ACCESS_KEY": "access-1", "S3_SECRET_KEY": "secret-123456", "NATS_PASSWORD": "n"}
    content = json.loads(interpolate(spec["configs"]["seaweedfs-s3-identities"]["content"], values))
    assert content == seaweedfs_identities("access-1", "secret-123456")
    env = spec["x-service"]["environment"]
    assert interpolate(env["LLAMADUO_S3_ACCESS_KEY"], values) == "access-1"
    assert interpolate(env["LLAMADUO_S3_SECRET_KEY"], values) == "secret-123456"
    assert interpolate(env["LLAMADUO_S3_ENDPOINT"], values) == "seaweedfs:8333"
    command = spec["services"]["seaweedfs"]["command"]
    target = spec["services"]["seaweedfs"]["configs"][0]["target"]
    assert f"-s3.config={target}" in command and "8333:8333" in spec["services"]["seaweedfs"]["ports"]
    with pytest.raises(KeyError, match="S3_SECRET_KEY"):  # no default secret
        interpolate(env["LLAMADUO_S3_SECRET_KEY"], {})


def test_image_keeps_hugging_face_settings_to_the_user_and_its_caches_on_volumes() -> None:
    dockerfile = DOCKERFILE.read_text()
    env_lines = " ".join(line for line in dockerfile.splitlines() if line.startswith("ENV"))
    assert "HF_HUB_OFFLINE" not in env_lines
    hf_home = re.search(r"HF_HOME=(\S+)", env_lines).group(1)
    cache = re.search(r"LLAMADUO_CACHE_DIR=(\S+)", env_lines).group(1)
    volume_line = next(line for line in dockerfile.splitlines() if line.startswith("VOLUME"))
    assert set(json.loads(volume_line.removeprefix("VOLUME"))) == {hf_home, cache}
    mounts = {m.split(":")[1] for m in compose()["x-service"]["volumes"]}
    assert {hf_home, cache} <= mounts
    env = compose()["x-service"]["environment"]
    assert interpolate(env["HF_HUB_OFFLINE"], {}) == ""  # offline only when the operator says so
    assert interpolate(env["HF_TOKEN"], {"HF_TOKEN": "hf_x"}) == "hf_x"


def test_our_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert compose()["x-service"]["image"] == f"llamaduo:{version}"


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("Docker Compose v2 is not installed here; the YAML checks above still ran")
    env = {"PATH": "/usr/bin:/bin", "NATS_PASSWORD": "n", "S3_SECRET_KEY": "secret-123456", "HOME": str(tmp_path)}
    for profiles in ("", "minio"):
        done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], cwd=tmp_path,
                              env={**env, "COMPOSE_PROFILES": profiles}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
