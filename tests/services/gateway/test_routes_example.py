"""The example routes file (``deploy/routes.example.yaml``) loads as the gateway loads it, and matches the
``gateway`` / ``student`` services of docker-compose.yml that mount and reach it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

from llamaduo.services.gateway.checks import make_validator
from llamaduo.services.gateway.config import load_routes

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "routes.example.yaml"


def test_the_example_loads_through_load_routes() -> None:
    config = load_routes(EXAMPLE)
    assert [r.name for r in config.routes] == ["support-triage", "invoice-extraction"]
    triage = config.route("support-triage")
    assert triage is not None and triage.local is not None and triage.validator is not None
    assert triage.upstream.api_key_env == "OPENAI_API_KEY" and triage.capture
    validator = make_validator(triage.validator, "example")
    assert validator is not None
    assert validator('{"queue": "billing", "priority": "high"}') is None  # a valid answer is accepted
    assert validator('{"queue": "sales", "priority": "high"}') is not None  # an invalid one falls back
    assert config.route("invoice-extraction").local is None  # type: ignore[union-attr]


def test_compose_mounts_the_example_and_its_local_server_is_the_student_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    gateway, student = services["gateway"], services["student"]
    [mount] = gateway["configs"]
    assert mount["target"] == gateway["command"][gateway["command"].index("--routes") + 1]
    assert "./deploy/routes.example.yaml" in compose["configs"][mount["source"]]["file"]
    assert gateway["ports"] == ["8080:8080"] and "--port" in gateway["command"]
    assert "ports" not in student  # only the gateway is published
    local = load_routes(EXAMPLE).route("support-triage").local  # type: ignore[union-attr]
    assert local is not None
    url = urlparse(local.base_url)
    assert url.hostname == "student"
    assert str(url.port) == student["command"][student["command"].index("--port") + 1]
    adapters_dir = student["command"][student["command"].index("--adapters-dir") + 1]
    assert local.adapters_dir == adapters_dir
    shared = {m for m in gateway["volumes"] if m.endswith(f":{adapters_dir}")}
    assert shared and shared <= set(student["volumes"])
    assert local.api_key_env in gateway["environment"]
