"""Rounds split across inference workers: two inference processes answer the shards of one round together."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from support.bus import stored_events

from llamaduo.bus.client import follow, publish_start, wait_ready
from llamaduo.contracts.events import Subject
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded
from llamaduo.services.inference.shards import PROMPTS_PER_SHARD
from llamaduo.storage.keys import predictions_key
from llamaduo.storage.store import ArtifactStore
from llamaduo.tasks.triage import make_dataset

pytestmark = pytest.mark.slow

TEST_ROWS = 6 * PROMPTS_PER_SHARD  # six shards: enough for both replicas to take some


def spec(data: Path) -> dict:
    return {
        "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data), "seed": 3},
        "student": {"base_model": "tiny:llama", "method": "full",
                    "training": {"epochs": 1, "batch_size": 8, "max_length": 96},
                    "inference": {"max_new_tokens": 24, "batch_size": 16}},
        "judge": {"threshold": 0, "batch_size": 10, "early_stopping": False},  # the whole round is judged
        "budget": {"max_rounds": 1},
    }


async def run(env: Embedded, data: Path) -> str:
    await wait_ready(env.settings)
    await publish_start(env.settings, "m-shards", parse_spec(spec(data)))
    async for event in follow(env.settings, "m-shards"):
        if event.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED):
            return str(event.type)
    return "no terminal event"


def shard_lines(env: Embedded) -> list[dict]:
    lines = []
    for p in env.processes:
        if p.name.startswith("inference") and p.log_path:
            for line in p.log_path.read_text().splitlines():
                if '"shard answered"' in line:
                    lines.append(json.loads(line))
    return lines


def test_two_inference_replicas_answer_one_round_together(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = make_dataset(n_train=8, n_test=TEST_ROWS, seed=5)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Embedded(tmp_path / "install", replicas={"inference": 2}) as env:
        result = asyncio.run(asyncio.wait_for(run(env, data), timeout=600))
        events = asyncio.run(stored_events(env.settings))
        answered = shard_lines(env)
        predictions = list(ArtifactStore(env.settings).iter_jsonl(predictions_key("m-shards", 0)))
    assert result == Subject.MIGRATION_COMPLETED
    shards = [e for e in events if e.type == Subject.INFER_SHARD]
    assert sorted(e.payload.shard for e in shards) == list(range(6)), "one infer.shard per shard, once each"
    # both replicas answered shards of the same round, each shard by one of them
    producers = {line["producer"] for line in answered}
    assert len(producers) == 2, f"shards answered by {producers}"
    assert sorted(line["shard"] for line in answered) == list(range(6))
    # every answer judged exactly once, batches numbered round-wide
    done = next(e for e in events if e.type == Subject.INFER_DONE)
    scored = [e for e in events if e.type == Subject.EVAL_SCORED]
    assert sorted(e.payload.batch for e in scored) == list(range(done.payload.batches))
    judged = [(s.item_id, s.sample) for e in scored for s in e.payload.scores]
    assert len(judged) == len(set(judged)) == TEST_ROWS
    assert {r["id"] for r in rows if r["split"] == "test"} == {i for i, _ in judged}
    # judging overlapped generation: a score was out before the last shard's judge requests
    types = [e.type for e in events]
    last_judge_request = max(i for i, t in enumerate(types) if t == Subject.JUDGE_REQUEST)
    assert types.index(Subject.EVAL_SCORED) < last_judge_request
    assert len(predictions) == TEST_ROWS, "the shards were joined into the round's predictions"
