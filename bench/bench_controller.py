"""Controller time per ``eval.scored`` at 100 and at 5,000 answers per round (issue 10: flat work).

Measures the **domain functions directly, no NATS**: per event, what the bus adapter does besides network
I/O: load the state from its JSON (as read from the KV bucket), apply :func:`domain.on_eval_scored`, dump the
state to JSON (as written back). Judge batches of 10 answers (so 10 and 500 events per round), early stopping
off so every batch is applied. Arrival order: shuffled within windows of 8 batches of the published order
(``ratio``, the figure the target is for: several judge workers), and uniformly shuffled over the whole
round (``shuffled_ratio``, the worst case for the in-order prefix: the state keeps at most ``PENDING_KEEP``
batches ahead of it and re-reads the others when the prefix gets there, here by parsing the batch's JSON
lines from memory as the app parses its S3 object, without the network; one read per batch, so still flat
per event on average, with a larger constant). Prints one JSON object on its last line: mean microseconds
per event at each size, their ratios (target <= 1.5) and the largest state JSON seen.

    .venv/bin/python bench/bench_controller.py
"""

from __future__ import annotations

import gc
import json
import random
import time

from llamaduo.contracts.events import ArtifactRef, EvalScored, InferDone, Score, Subject, TrainDone, start_envelope
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs, GateStats, MigrationState
from llamaduo.services.controller import domain

BATCH = 10
SPEC = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"gate": "similarity_mean", "threshold": 99, "batch_size": BATCH, "early_stopping": False},
    "budget": {"max_rounds": 3},
}


def per_event(answers: int, seed: int = 0, window: int = 8) -> tuple[float, int]:
    """Mean seconds per eval.scored over one round of ``answers`` answers, and the largest state JSON."""
    start = start_envelope("m-bench", SPEC)
    state, _ = domain.start(start, parse_spec(SPEC), DataRefs(
        train=ArtifactRef(key="t", rows=100), coverage=ArtifactRef(key="c", rows=50),
        test=ArtifactRef(key="s", rows=answers)))
    batches = answers // BATCH
    domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a"), rows=50)))
    domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=answers, samples_per_prompt=1, batches=batches)))
    rng = random.Random(seed)
    events = [start.follow(Subject.EVAL_SCORED, EvalScored(batch=b, batches=batches, scores=[
        Score(item_id=f"i{b * BATCH + j}", similarity=rng.randint(1, 100), precision=rng.randint(1, 100),
              reason="the answer names the right queue but misses the priority field")
        for j in range(BATCH)]), key=f"b{b}") for b in range(batches)]
    stored = {b: "\n".join(s.model_dump_json() for s in e.payload.scores).encode() for b, e in enumerate(events)}

    def load(round: int, batch: int) -> GateStats:
        return GateStats.from_scores([Score.model_validate_json(line) for line in stored[batch].splitlines()])

    # arrival: within each ``window`` of the published order batches come back shuffled (several judge workers);
    # window >= batches is a uniform shuffle of the whole round
    order = list(range(batches))
    for i in range(0, batches, window):
        chunk = order[i:i + window]
        rng.shuffle(chunk)
        order[i:i + window] = chunk
    blob = state.model_dump_json()
    largest, spent = len(blob), 0.0
    gc.collect()
    gc.disable()  # the bench holds every event of the round in memory; the controller holds one at a time
    try:
        spent = _apply(blob, order, events, load, sizes := [largest])
    finally:
        gc.enable()
    return spent / batches, max(sizes)


def _apply(blob: str, order: list[int], events: list, load, sizes: list[int]) -> float:
    """Apply the events in ``order`` as the app does (state JSON in and out); total seconds."""
    spent = 0.0
    for b in order:
        t0 = time.perf_counter()
        s = MigrationState.model_validate_json(blob)
        domain.on_eval_scored(s, events[b], load)
        s.mark_applied(events[b].event_id)
        blob = s.model_dump_json()
        spent += time.perf_counter() - t0
        sizes.append(len(blob))
    return spent


def main() -> None:
    per_event(100)  # warm up
    small = min(per_event(100, seed)[0] for seed in range(5))
    large_runs = [per_event(5000, seed) for seed in range(3)]
    large = min(t for t, _ in large_runs)
    worst_small = min(per_event(100, seed, window=10**9)[0] for seed in range(5))
    worst_large = min(per_event(5000, seed, window=10**9)[0] for seed in range(3))
    result = {
        "bench": "controller_per_eval_scored", "measured": "domain functions + state JSON load/dump, no NATS",
        "batch_size": BATCH, "us_per_event_100": round(small * 1e6, 1), "us_per_event_5000": round(large * 1e6, 1),
        "ratio": round(large / small, 3), "target_ratio": 1.5,
        "largest_state_bytes_5000": max(size for _, size in large_runs),
        "shuffled_us_per_event_100": round(worst_small * 1e6, 1),
        "shuffled_us_per_event_5000": round(worst_large * 1e6, 1),
        "shuffled_ratio": round(worst_large / worst_small, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
