"""Where a demo-shaped migration's wall time goes: the demo spec on an embedded installation, split by stage
from its events (:mod:`llamaduo.reporting.timeline`).

Each service reports the work behind the event it publishes (model load, training, generation, judging,
synthesis, other handler work such as S3 reads and writes); wall time covered by no reported work is bus or
idle. Overlaps (judging beside generation) are shared between the stages, so the shares add up to 1.

Usage: ``python bench/bench_stages.py``. CPU-heavy (it is ``llamaduo demo``): run it alone. Last stdout line:
one JSON object: the command's wall time (servers and services started and stopped included, as ``make demo``
without its setup), the migration's wall time, seconds and shares by stage, the idle/bus share and the targets
(command <= 300 s, idle/bus < 5 %).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import time
from importlib import resources
from pathlib import Path

from llamaduo.cli.migrate import DEMO_SPEC, run_migration
from llamaduo.contracts.spec import load_spec
from llamaduo.reporting.timeline import IDLE, StageSplit, describe_split
from llamaduo.runtime.embedded import Embedded

TARGET_DEMO_S = 300.0
TARGET_IDLE_SHARE = 0.05


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with resources.as_file(resources.files("llamaduo.tasks").joinpath(DEMO_SPEC)) as path:
        spec = load_spec(path)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        with Embedded(Path(tmp)) as env:
            summary = asyncio.run(run_migration(env.settings, spec, "m-bench-stages", io.StringIO(),
                                                timeout=1800, embedded=env, live=False))
        command_s = time.monotonic() - began
    split = StageSplit.model_validate(summary["stages"])
    result = {
        "bench": "demo_stage_split", "status": summary["status"],
        "rounds": [{"round": r["round"], "training_rows": r["training_rows"], "decision": r["decision"],
                    "similarity": r["aggregates"].get("similarity_mean")} for r in summary["rounds"]],
        "command_s": round(command_s, 1), "migration_s": split.wall_seconds,
        "seconds": split.seconds, "shares": split.shares, "busy_seconds": split.busy_seconds,
        "overlap_s": split.overlap_seconds, "idle_share": split.shares[IDLE],
        "targets": {"command_s": TARGET_DEMO_S, "idle_share": TARGET_IDLE_SHARE},
        "meets_targets": command_s <= TARGET_DEMO_S and split.shares[IDLE] < TARGET_IDLE_SHARE,
        "cpus": os.cpu_count(),
    }
    print(f"demo-shaped migration ({summary['status']}): {describe_split(split)}; command {command_s:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
