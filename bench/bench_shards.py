"""Round inference with 1 and 2 inference replicas (separate processes), and how soon judging starts.

One migration per setting on an embedded installation (nats-server, S3 fixture, every service a process), tiny
student, ``TEST_ROWS`` eval prompts (``TEST_ROWS / PROMPTS_PER_SHARD`` shards), one round (threshold 0), whole
round judged (no early stopping). From the events stored in the stream (``occurred_at``, set by the publisher):

* round inference wall time: ``infer.done`` (the round split into shards) -> the last ``judge.request`` (the
  last shard answered);
* first answer -> first judgement: the first ``judge.request`` -> the first ``eval.scored`` (with sharding it
  comes while other shards are still being generated: ``scored_before_last_answer`` says so).

Usage: ``python bench/bench_shards.py [TEST_ROWS]``. Last stdout line: one JSON object with every figure. On a
machine with fewer cores than replicas x torch threads the ratio is bounded by the cores, not by the bus: run it
with ``OMP_NUM_THREADS=1`` there. Measured on a shared 2-core machine (a test run going on beside it), 256 prompts,
8 shards: ``OMP_NUM_THREADS=1``: 5.26 s with 1 replica, 3.73 s with 2 (x1.41), first answer -> first judgement
0.07 s / 0.03 s; torch's default threads: 6.57 s / 8.75 s (x0.75: two processes fight for two cores), 0.28 s /
0.09 s. In both, 28 of the 32 judge batches were scored before the last shard was answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llamaduo.bus.client import follow, publish_start, wait_ready
from llamaduo.contracts.events import Subject
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded
from llamaduo.services.inference.shards import PROMPTS_PER_SHARD
from llamaduo.settings import Settings
from llamaduo.tasks.triage import make_dataset

TEST_ROWS = 8 * PROMPTS_PER_SHARD


def spec(data: Path) -> dict:
    return {
        "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data), "seed": 3},
        "student": {"base_model": "tiny:llama", "method": "full",
                    "training": {"epochs": 1, "batch_size": 8, "max_length": 96},
                    "inference": {"max_new_tokens": 32, "batch_size": 16}},
        "judge": {"threshold": 0, "batch_size": 10, "early_stopping": False},
        "budget": {"max_rounds": 1},
    }


async def events_of(settings: Settings) -> list:
    """The installation's stored events, in stream order (the CLI's reader: ``llamaduo events``)."""
    return [env async for env in follow(settings, live=False)]


async def migrate(env: Embedded, data: Path) -> list:
    await wait_ready(env.settings)
    await publish_start(env.settings, "m-bench-shards", parse_spec(spec(data)))
    async for event in follow(env.settings, "m-bench-shards"):
        if event.type in (Subject.MIGRATION_COMPLETED, Subject.MIGRATION_FAILED):
            assert event.type == Subject.MIGRATION_COMPLETED, event
            break
    return await events_of(env.settings)


def one(replicas: int, rows: int, root: Path) -> dict:
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_dataset(n_train=8, n_test=rows, seed=5)))
    began = time.monotonic()
    with Embedded(root / f"install-{replicas}", replicas={"inference": replicas}) as env:
        events = asyncio.run(asyncio.wait_for(migrate(env, data), timeout=1800))
    at = {t: [e.occurred_at.timestamp() for e in events if e.type == t]
          for t in (Subject.INFER_DONE, Subject.JUDGE_REQUEST, Subject.EVAL_SCORED)}
    inference = max(at[Subject.JUDGE_REQUEST]) - min(at[Subject.INFER_DONE])
    first_judgement = min(at[Subject.EVAL_SCORED]) - min(at[Subject.JUDGE_REQUEST])
    return {"replicas": replicas, "round_inference_s": round(inference, 2),
            "first_answer_to_first_judgement_s": round(first_judgement, 2),
            "scored_before_last_answer": sum(t < max(at[Subject.JUDGE_REQUEST]) for t in at[Subject.EVAL_SCORED]),
            "judge_batches": len(at[Subject.JUDGE_REQUEST]), "migration_s": round(time.monotonic() - began, 1)}


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else TEST_ROWS
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for replicas in (1, 2):
            root = Path(tmp) / f"r{replicas}"
            root.mkdir()
            results.append(one(replicas, rows, root))
            print(json.dumps(results[-1]), flush=True)
    one_, two = results
    summary = {"test_rows": rows, "shards": -(-rows // PROMPTS_PER_SHARD), "cpus": os.cpu_count(),
               "inference_1_replica_s": one_["round_inference_s"], "inference_2_replicas_s": two["round_inference_s"],
               "speedup_2_over_1": round(one_["round_inference_s"] / two["round_inference_s"], 2),
               "first_answer_to_first_judgement_s": {"1": one_["first_answer_to_first_judgement_s"],
                                                     "2": two["first_answer_to_first_judgement_s"]},
               "runs": results}
    print(f"round inference: 1 replica {one_['round_inference_s']} s, 2 replicas {two['round_inference_s']} s "
          f"(x{summary['speedup_2_over_1']}); first answer -> first judgement "
          f"{one_['first_answer_to_first_judgement_s']} s / {two['first_answer_to_first_judgement_s']} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
