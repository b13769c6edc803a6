"""deploy/ (a kustomize base, deploy/README.md): every manifest loads, each KEDA trigger names the stream and a durable
consumer the services really create (from shared/bus/topology.py through the services' own registration, with the
ConfigMap's settings), compose, manifests and Settings agree on every ``LLAMADUO_*`` name, images are pinned, and
the KEDA and NATS chart pins are the ones deploy/README.md explains. ``kubectl kustomize`` renders the base when
kubectl is installed (it carries kustomize; no helm binary is installable from the registries here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llamaduo.runtime.service import SERVICES, build
from llamaduo.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCALED = {"inference", "judge", "synthesizer"}


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects() -> list[dict]:
    kust = _load(DEPLOY / "kustomization.yaml")[0]
    return [d for res in kust["resources"] for d in _load(DEPLOY / res)]


def _kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _objects() if d["kind"] == kind}


def _containers(objs: list[dict]) -> list[dict]:
    return [c for d in objs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]


def _config() -> dict[str, str]:
    return _kind("ConfigMap")["llamaduo-config"]["data"]


def _code_consumers(settings: Settings) -> dict[str, set[tuple[str, str]]]:
    """(stream, durable) of every consumer each service subscribes, as its own start declares them."""
    found: dict[str, set[tuple[str, str]]] = {}
    for name in SERVICES:
        found[name] = {(s.stream.name, s.extra_options["durable"]) for s in build(name, settings).broker.subscribers}
    return found


def test_every_manifest_of_deploy_loads_and_the_base_lists_every_k8s_file():
    files = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml"))
    for f in files:
        assert _load(DEPLOY / f), f
    listed = set(_load(DEPLOY / "kustomization.yaml")[0]["resources"])
    assert {f for f in files if f.startswith("k8s/")} == listed
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _objects()}
    for svc in SERVICES:
        assert ("Deployment", svc) in kinds
    assert ("Service", "gateway") in kinds
    assert {n for k, n in kinds if k == "ScaledObject"} == SCALED


def test_each_keda_trigger_names_a_stream_and_durable_the_code_creates():
    cfg = _config()
    settings = Settings(subject_prefix=cfg.get("LLAMADUO_SUBJECT_PREFIX", ""))
    code = _code_consumers(settings)
    nats = _load(DEPLOY / "nats" / "values.yaml")[0]
    namespace = _load(DEPLOY / "kustomization.yaml")[0]["namespace"]
    for name, so in _kind("ScaledObject").items():
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        # the services' own start creates the consumers: at least one replica runs before the scaler reads them
        assert spec["minReplicaCount"] >= 1
        assert spec["triggers"]
        for trig in spec["triggers"]:
            assert trig["type"] == "nats-jetstream"
            meta = trig["metadata"]
            assert set(meta) <= {"natsServerMonitoringEndpoint", "account", "accountID", "stream", "consumer",
                                 "lagThreshold", "activationLagThreshold", "useHttps"}
            assert (meta["stream"], meta["consumer"]) in code[name], (name, meta, code[name])
            assert meta["stream"] == settings.stream_name
            assert int(meta["lagThreshold"]) > 0
            # the headless Service of the NATS release: KEDA finds the consumer's leader among its pods
            assert meta["natsServerMonitoringEndpoint"] == (
                f"nats-headless.{namespace}.svc.cluster.local:{nats['config']['monitor']['port']}")


def _llamaduo_names(text: str) -> set[str]:
    return set(re.findall(r"\bLLAMADUO_[A-Z0-9_]+\b", text))


def test_compose_manifests_and_settings_agree_on_every_llamaduo_name():
    fields = {f"LLAMADUO_{f.upper()}" for f in Settings.model_fields}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_names = {k for svc in compose["services"].values() for k in (svc.get("environment") or {})
                     if k.startswith("LLAMADUO_")}
    k8s_names = set(_config())
    for c in _containers(_objects()):
        k8s_names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("LLAMADUO_")}
    assert compose_names - fields == set(), "compose sets names Settings does not read"
    assert k8s_names - fields == set(), "the manifests set names Settings does not read"
    assert compose_names - {"LLAMADUO_API_KEYS"} <= k8s_names, "compose sets names the manifests do not"
    readme = (DEPLOY / "README.md").read_text()
    assert _llamaduo_names(readme) <= fields


def test_secrets_come_from_secrets_and_every_service_gets_them():
    for c in _containers(_objects()):
        env = {e["name"]: e for e in c["env"]}
        for name in ("LLAMADUO_NATS_PASSWORD", "LLAMADUO_S3_SECRET_KEY", "LLAMADUO_S3_ACCESS_KEY", "OPENAI_API_KEY"):
            assert "secretKeyRef" in env[name]["valueFrom"], (c["name"], name)
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert not any(d["kind"] == "Secret" for d in _objects()), "no secret values in the repository"
    secret_words = ("PASSWORD", "SECRET", "KEY", "TOKEN")
    assert not [k for k in _config() if any(w in k for w in secret_words)]


def test_trainer_is_a_gpu_deployment_and_the_gateway_a_deployment_behind_a_service():
    trainer = _kind("Deployment")["trainer"]["spec"]["template"]["spec"]
    assert trainer["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in trainer["tolerations"])
    assert trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    gw = _kind("Deployment")["gateway"]
    svc = _kind("Service")["gateway"]
    assert svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()


def test_images_are_pinned():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for c in _containers(_objects()):
        repo, _, tag = c["image"].rpartition(":")
        assert repo and tag and tag != "latest", c["image"]
        assert tag == version
    nats = _load(DEPLOY / "nats" / "values.yaml")[0]["container"]["image"]
    assert nats["tag"] and nats["tag"] != "latest"
    compose_nats = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["nats"]["image"]
    assert compose_nats == f"{nats['repository']}:{nats['tag']}", "Kubernetes runs the NATS server compose runs"


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).lstrip("v").split("."))


def test_nats_chart_values_and_keda_pin():
    deps = _load(DEPLOY / "dependencies.yaml")[0]
    keda = _version(deps["keda"]["version"])
    assert keda >= (2, 15, 1), "kedacore/keda#6042: the scaler follows the consumer leader from 2.15.1"
    assert keda >= (2, 20, 0), "kedacore/keda#7657: a missing consumer is an error, not maxReplicaCount, from 2.20.0"
    nats = _load(DEPLOY / deps["nats"]["values"])[0]["config"]
    assert nats["cluster"]["enabled"] is True and nats["cluster"]["replicas"] == 3
    assert nats["jetstream"]["enabled"] is True
    assert _config()["LLAMADUO_NATS_REPLICAS"] == str(nats["cluster"]["replicas"])
    readme = (DEPLOY / "README.md").read_text()
    for dep in ("nats", "keda"):
        assert f"--version {deps[dep]['version']}" in readme, f"deploy/README.md installs another {dep}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
def test_kustomize_renders_the_base():
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {(d["kind"], d["metadata"]["name"]) for d in _objects()} <= names
    assert all(d["metadata"].get("namespace") == "llamaduo" for d in docs)
    routes = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gateway-routes"))
    assert yaml.safe_load(routes["data"]["routes.yaml"]) == yaml.safe_load((DEPLOY / "routes.example.yaml").read_text())
    gw = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway")
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert vols["routes"]["configMap"]["name"] == routes["metadata"]["name"]
