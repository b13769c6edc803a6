"""Many migrations at once on one installation, each isolated: no cross-talk between their artifacts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from llamaduo.bus.client import follow, publish_start, wait_ready
from llamaduo.contracts.events import Subject
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded
from llamaduo.storage.store import ArtifactStore
from llamaduo.tasks.triage import make_dataset

pytestmark = pytest.mark.slow

N = 20


def spec(data: Path) -> dict:
    return {
        "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data)},
        "student": {"base_model": "tiny:llama", "method": "full",
                    "training": {"epochs": 1, "batch_size": 8, "max_length": 96},
                    "inference": {"max_new_tokens": 4, "batch_size": 8}},
        "judge": {"threshold": 0, "batch_size": 4, "early_stopping": False},  # every migration passes round 0
        "budget": {"max_rounds": 1},
    }


async def run_all(env: Embedded, specs: dict[str, dict]) -> dict[str, str]:
    await wait_ready(env.settings)

    async def one(mid: str) -> str:
        await publish_start(env.settings, mid, parse_spec(specs[mid]))
        async for event in follow(env.settings, mid):
            if event.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED):
                return str(event.type)
        return "no terminal event"

    results = await asyncio.wait_for(asyncio.gather(*(one(m) for m in specs)), timeout=600)
    return dict(zip(specs, results, strict=True))


def test_twenty_concurrent_migrations_stay_isolated(tmp_path: Path) -> None:
    specs, tests = {}, {}
    for i in range(N):
        data = tmp_path / f"d{i}.jsonl"
        rows = make_dataset(n_train=6, n_test=4, seed=100 + i)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        mid = f"m-scale-{i:02d}"
        specs[mid] = spec(data)
        tests[mid] = {r["instruction"] for r in rows if r["split"] == "test"}
    replicas = {"trainer": 2, "judge": 2}
    with Embedded(tmp_path / "install", replicas=replicas) as env:
        results = asyncio.run(run_all(env, specs))
        store = ArtifactStore(env.settings)
        manifests = {mid: store.get_json(f"migrations/{mid}/manifest.json") for mid in specs}
        predictions = {mid: list(store.iter_jsonl(m["rounds"][0]["predictions"]["key"]))
                       for mid, m in manifests.items()}
    assert results == dict.fromkeys(specs, "migration.completed")
    for mid, manifest in manifests.items():
        first = manifest["rounds"][0]
        keys = [first["adapter"]["key"], first["predictions"]["key"], *(d["key"] for d in first["trained_on"]),
                *(v["key"] for v in manifest["data"].values())]
        assert all(k.startswith(f"migrations/{mid}/") for k in keys), keys
        assert {p["instruction"] for p in predictions[mid]} == tests[mid], f"{mid} answered another's test set"
