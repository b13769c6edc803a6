"""Targeted vs uniform synthesis on the demo task: synthetic rows needed to reach the gate, over several seeds.

For each dataset seed and each ``synthesis.strategy`` one migration of the demo spec (invoice extraction,
SmolLM2-135M, simulated teacher, the same 16 coverage rows per seed) runs on one embedded installation, one at
a time, with finer synthesis steps than the demo's (``SAMPLES_PER_ROUND`` new rows a round instead of 128) and
up to ``MAX_ROUNDS`` rounds, no holdout. Uniform draws its seeds at random from the train split; targeted
deals each eval item that held the last round below the gate (similarity under 90), worst first, its nearest
train row (in words and in formats), then each its next nearest.

Rows to gate = the synthetic rows in the training set of the round that passed (the terminal event's rounds);
a migration that never passes is censored: its figure is a lower bound (``passed: false``) and the ratio says
so. Rows at crossing: where the gate score crosses the threshold, interpolated between the round before the
passing one and the passing one: an estimate finer than the step, reported beside the measured rows (the target
is judged on the measured rows). Both strategies of a seed share everything but the seed choice (round 0 is
the same run twice: the loop has no way to share it).

Usage: ``python bench/bench_synthesis.py [SEEDS]``: a count (seeds 0 .. SEEDS-1, default 3) or a comma-separated
list of seeds (``3,4``: more seeds beside an earlier run). CPU-heavy: run it alone. One JSON line per
migration as it ends; last stdout line: one JSON object with the rows per seed, the medians, min-max spreads
and the targeted/uniform ratio of the medians (target <= 0.7).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml

from llamaduo.cli.migrate import DEMO_SPEC, run_migration
from llamaduo.contracts.spec import parse_spec
from llamaduo.runtime.embedded import Embedded

SAMPLES_PER_ROUND = 32
MAX_ROUNDS = 6
STRATEGIES = ("uniform", "targeted")


def spec_for(seed: int, strategy: str) -> dict:
    """The demo spec with this seed and strategy, finer synthesis steps, more rounds, no holdout."""
    data = yaml.safe_load(resources.files("llamaduo.tasks").joinpath(DEMO_SPEC).read_text())
    data["dataset"].update(seed=seed, holdout_size=0)
    data["synthesis"].update(samples_per_round=SAMPLES_PER_ROUND, strategy=strategy)
    data["budget"]["max_rounds"] = MAX_ROUNDS
    return data


def rows_to_gate(summary: dict) -> tuple[int, bool]:
    """(synthetic rows of the passing round, True), or (those of the last round, False) when none passed."""
    rounds = summary["rounds"]
    for r in rounds:
        if r["decision"] == "pass":
            return r["synthetic_rows"], True
    return (rounds[-1]["synthetic_rows"] if rounds else 0), False


def rows_at_crossing(rounds: list[dict], threshold: float = 90.0) -> float | None:
    """Where the gate score crosses ``threshold``, linearly interpolated in synthetic rows between the round before
    the passing one and the passing one (an estimate finer than the rounds' step); None when no round passed."""
    for before, after in zip([None, *rounds], rounds, strict=False):
        if after["decision"] != "pass":
            continue
        if before is None or after["similarity"] <= before["similarity"]:
            return float(after["synthetic_rows"])
        share = (threshold - before["similarity"]) / (after["similarity"] - before["similarity"])
        return round(before["synthetic_rows"] + max(0.0, share) * (after["synthetic_rows"] - before["synthetic_rows"]),
                     1)
    return None


def one(env: Embedded, seed: int, strategy: str) -> dict:
    spec = parse_spec(spec_for(seed, strategy), "bench")
    began = time.monotonic()
    summary = asyncio.run(run_migration(env.settings, spec, f"m-synth-{strategy}-{seed}", io.StringIO(),
                                        timeout=3600, embedded=env, live=False))
    rows, passed = rows_to_gate(summary)
    rounds = [{"round": r["round"], "synthetic_rows": r["synthetic_rows"],
               "similarity": r["aggregates"].get("similarity_mean"), "decision": r["decision"],
               "early_stopped": r["early_stopped"]} for r in summary["rounds"]]
    return {"seed": seed, "strategy": strategy, "rows_to_gate": rows, "passed": passed,
            "rows_at_crossing": rows_at_crossing(rounds, spec.judge.threshold), "rounds": rounds,
            "seconds": round(time.monotonic() - began, 1)}


def spread(values: list[int]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"3,4"`` -> seeds 3 and 4."""
    return [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))


def main() -> None:
    seeds = parse_seeds(sys.argv[1] if len(sys.argv) > 1 else "3")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: list[dict] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Embedded(Path(tmp)) as env:
        for seed in seeds:
            for strategy in STRATEGIES:
                runs.append(one(env, seed, strategy))
                print(json.dumps(runs[-1]), flush=True)
    by = {s: [r for r in runs if r["strategy"] == s] for s in STRATEGIES}
    rows = {s: [r["rows_to_gate"] for r in by[s]] for s in STRATEGIES}
    censored = {s: sum(not r["passed"] for r in by[s]) for s in STRATEGIES}
    medians = {s: statistics.median(rows[s]) for s in STRATEGIES}
    ratio = medians["targeted"] / medians["uniform"] if medians["uniform"] else None
    per_seed = [round(t["rows_to_gate"] / u["rows_to_gate"], 3) if u["rows_to_gate"] else None
                for u, t in zip(by["uniform"], by["targeted"], strict=True)]
    crossing = {s: [r["rows_at_crossing"] for r in by[s] if r["rows_at_crossing"] is not None] for s in STRATEGIES}
    crossing_ratio = (statistics.median(crossing["targeted"]) / statistics.median(crossing["uniform"])
                      if crossing["uniform"] and crossing["targeted"] and statistics.median(crossing["uniform"])
                      else None)
    result = {
        "bench": "synthesis_rows_to_gate", "task": "invoice demo", "seeds": seeds,
        "samples_per_round": SAMPLES_PER_ROUND, "max_rounds": MAX_ROUNDS,
        "rows_to_gate": rows, "spread": {s: spread(rows[s]) for s in STRATEGIES},
        "censored": censored, "targeted_over_uniform": round(ratio, 3) if ratio is not None else None,
        "per_seed_ratio": per_seed, "target": 0.7,
        "rows_at_crossing": crossing, "crossing_spread": {s: spread(crossing[s]) for s in STRATEGIES if crossing[s]},
        "crossing_ratio": round(crossing_ratio, 3) if crossing_ratio is not None else None,
        "meets_target": ratio is not None and ratio <= 0.7 and censored["targeted"] == 0,
        "minutes": round((time.monotonic() - began) / 60, 1),
    }
    print(f"rows to gate: uniform {rows['uniform']}, targeted {rows['targeted']} "
          f"(median ratio {result['targeted_over_uniform']}, censored {censored})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
