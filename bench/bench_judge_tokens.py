"""Judge token benchmark on the demo task (invoice extraction): what judging costs in service tokens.

The same rounds of candidate answers (the demo spec's 50 test items) are judged by two setups, each driven
through the real controller state machine (``services/controller/domain.py``: gating, early stopping)
and the real judge (``services/judge/domain.judge_items``) with the simulated provider, whose token counts
are the prompt and reply sizes (4 characters a token):

* **naive**: the paper's setup: M = 3 judgements per answer (sampled at temperature 0.7, as M > 1 needs),
  every answer of every round judged, no cache;
* each saving on its own, everything else as naive: **cache** (the judge cache kept across rounds: an answer
  the student did not change is not judged again), **early stopping** (remaining batches skipped once the
  round's gate is decided; a worker skips a closed round's batches), **M = 1** (at temperature 0);
* **ours**: the defaults, all three together.

Candidate answers are the oracle's reference answers perturbed deterministically: round 0 far below the gate,
rounds 1 and 2 just below it and round 3 just above it (the rounds where early stopping cannot decide early).
An answer right in one round stays right in later rounds, but a retrained student does not keep its wording:
``REWORDED`` of the right answers come back re-serialised (other key order and spacing, same fields) in each
later round, so the cache only saves what really repeats.
``workers`` models judge workers in parallel: with W workers, the W - 1 batches already in flight when a
round closes are still judged (and paid).

Last stdout line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import random
import sys
from importlib import resources
from typing import Any

import yaml

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    JudgeItem,
    Subject,
    SynthReady,
    TrainDone,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import MigrationSpec, parse_spec
from llamaduo.data.datasets import load_splits
from llamaduo.providers.base import make_provider
from llamaduo.services.controller import domain
from llamaduo.services.judge.domain import JudgeCache, judge_items

#: per round: share of answers right, share malformed, how many fields a wrong answer gets wrong
ROUNDS = [
    {"right": 0.20, "garbled": 0.35, "wrong_fields": (2, 4)},  # far below the gate
    {"right": 0.60, "garbled": 0.05, "wrong_fields": (1, 2)},  # just below
    {"right": 0.61, "garbled": 0.04, "wrong_fields": (1, 2)},  # just below
    {"right": 0.62, "garbled": 0.00, "wrong_fields": (1, 2)},  # just above
]
#: share of the right answers re-serialised (same fields, other wording) in each round after the first
REWORDED = 0.3


def demo_spec() -> MigrationSpec:
    text = resources.files("llamaduo.tasks").joinpath("invoice_demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["budget"] = {**data.get("budget", {}), "max_rounds": len(ROUNDS)}
    return parse_spec(data)


def _wrong(field: str, value: Any, rng: random.Random) -> Any:
    if field in ("date", "due_date"):
        if value is None:
            return "2024-01-31"
        return (dt.date.fromisoformat(value) + dt.timedelta(days=rng.choice([-31, -1, 1, 30]))).isoformat()
    if field == "total":
        return round(float(value) * rng.choice([0.1, 10]) + 1, 2)
    if field == "currency":
        return rng.choice([c for c in ("EUR", "USD", "GBP", "JPY", "CHF") if c != value])
    return f"{value} {rng.choice(['Ltd', 'Inc', 'X', '7'])}"  # vendor, invoice_number


def candidates(test: list, round: int) -> list[str]:
    """The student's answers in ``round``: deterministic, nested right-sets across rounds."""
    cfg = ROUNDS[round]
    out = []
    for example in test:
        u = random.Random(f"skill-{example.id}").random()  # how hard this item is, fixed across rounds
        rng = random.Random(f"answer-{round}-{example.id}")
        if u < cfg["right"]:
            if round > 0 and rng.random() < REWORDED:  # same fields, the student's wording of this round
                fields = json.loads(example.response)
                keys = sorted(fields, reverse=rng.random() < 0.5)
                out.append(json.dumps({k: fields[k] for k in keys}, ensure_ascii=False,
                                      separators=rng.choice([(",", ":"), (", ", ": "), (",", ": ")])))
            else:
                out.append(example.response)
            continue
        if rng.random() < cfg["garbled"] / (1 - cfg["right"]):
            out.append(example.response[: len(example.response) // 2])  # cut off mid-JSON
            continue
        answer = json.loads(example.response)
        lo, hi = cfg["wrong_fields"]
        for field in rng.sample(sorted(answer), rng.randint(lo, hi)):
            answer[field] = _wrong(field, answer[field], rng)
        out.append(json.dumps(answer, ensure_ascii=False))
    return out


async def run_setup(spec: MigrationSpec, test: list, rounds: list[list[str]], *, cache: JudgeCache | None,
                    workers: int = 1) -> dict[str, Any]:
    """Drive the controller and the judge through every round; return tokens, calls, decisions."""
    provider = make_provider(spec.judge_llm, spec.task)
    data = domain.DataRefs(train=ArtifactRef(key="t", rows=1), coverage=ArtifactRef(key="c", rows=16),
                           test=ArtifactRef(key="s", rows=len(test)))
    start = start_envelope("bench-judge", spec.model_dump(mode="json"))
    state, _ = domain.start(start, spec, data)
    size = spec.judge.batch_size
    usage = Usage()
    per_round = []
    for r, answers in enumerate(rounds):
        if state.done:
            break
        if r > 0:
            domain.on_synth_ready(state, start.follow(Subject.SYNTH_READY, SynthReady(
                dataset=ArtifactRef(key=f"s{r}", rows=64), generated=64, kept=64), round=r))
        domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(
            adapter=ArtifactRef(key=f"a{r}"), rows=16), round=r))
        items = [JudgeItem(item_id=e.id, instruction=e.instruction, reference=e.response, candidate=a)
                 for e, a in zip(test, answers, strict=True)]
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
            predictions=ArtifactRef(key=f"p{r}"), prompts=len(items), samples_per_prompt=1,
            batches=len(batches)), round=r))
        round_usage, judged_batches, closed_at = Usage(), 0, None
        for b, chunk in enumerate(batches):
            rnd = state.rounds[r]
            if closed_at is None and (rnd.judging_closed or rnd.summary is not None):
                closed_at = b
            if closed_at is not None and b >= closed_at + workers - 1:
                continue  # the marker is there before this batch starts: skipped, no call
            scores, used = await judge_items(chunk, provider, spec.judge, spec.judge_llm.temperature,
                                             cache=cache if cache is not None else JudgeCache(max_entries=0))
            judged_batches += 1
            round_usage = round_usage + used
            domain.on_eval_scored(state, start.follow(Subject.EVAL_SCORED, EvalScored(
                batch=b, batches=len(batches), scores=scores, usage=used), round=r, key=f"b{b}"))
        usage = usage + round_usage
        s = state.rounds[r].summary
        assert s is not None
        per_round.append({
            "round": r, "decision": s.decision, "gate": round(s.aggregates.get(spec.judge.gate, 0.0), 2),
            "judged": s.judged, "to_judge": s.to_judge, "batches_judged": judged_batches,
            "batches": len(batches), "early_stopped": s.early_stopped,
            "interval": [round(v, 1) for v in s.gate_interval] if s.gate_interval else None,
            "calls": round_usage.calls, "cached": round_usage.cached, "tokens": round_usage.tokens,
        })
    return {"tokens": usage.tokens, "calls": usage.calls, "cached": usage.cached, "outcome": state.outcome,
            "decisions": [p["decision"] for p in per_round], "rounds": per_round}


def variant(spec: MigrationSpec, *, m: int, temperature: float, early: bool) -> MigrationSpec:
    data = copy.deepcopy(spec.model_dump(mode="json"))
    data["judge"].update(judgements_per_answer=m, early_stopping=early)
    data["teacher"]["temperature"] = temperature
    return parse_spec(data)


async def main() -> dict[str, Any]:
    spec = demo_spec()
    test = load_splits(spec.dataset).test
    rounds = [candidates(test, r) for r in range(len(ROUNDS))]
    paper = {"m": 3, "temperature": 0.7}
    naive = await run_setup(variant(spec, **paper, early=False), test, rounds, cache=None)
    cache_only = await run_setup(variant(spec, **paper, early=False), test, rounds, cache=JudgeCache())
    early_only = await run_setup(variant(spec, **paper, early=True), test, rounds, cache=None)
    m1_only = await run_setup(variant(spec, m=1, temperature=0.0, early=False), test, rounds, cache=None)
    ours = await run_setup(spec, test, rounds, cache=JudgeCache())
    ours_w2 = await run_setup(spec, test, rounds, cache=JudgeCache(), workers=2)
    assert spec.judge.judgements_per_answer == 1 and spec.judge.early_stopping and spec.judge_llm.temperature == 0
    setups = {"naive": naive, "cache_only": cache_only, "early_stopping_only": early_only, "m1_only": m1_only,
              "ours": ours, "ours_2_workers": ours_w2}
    return {
        "task": spec.task.name, "test_items": len(test), "rounds": len(rounds), "batch_size": spec.judge.batch_size,
        "gate": f"{spec.judge.gate} >= {spec.judge.threshold}", "confidence": spec.judge.confidence,
        "reworded_share": REWORDED, "naive_m": paper["m"],
        "provider": "simulated (token counts: prompt and reply characters / 4)",
        "naive_tokens": naive["tokens"], "ours_tokens": ours["tokens"],
        "ratio": round(ours["tokens"] / naive["tokens"], 4),
        "target_ratio_max": 0.5,
        "ratio_each_saving_alone": {k: round(v["tokens"] / naive["tokens"], 4) for k, v in setups.items()
                                    if k not in ("naive",)},
        "tokens": {k: v["tokens"] for k, v in setups.items()},
        "calls": {k: v["calls"] for k, v in setups.items()},
        "cached": {k: v["cached"] for k, v in setups.items()},
        "same_decisions": all(v["decisions"] == naive["decisions"] and v["outcome"] == naive["outcome"]
                              for v in setups.values()),
        "decisions": {k: v["decisions"] for k, v in setups.items()},
        "gates": [r["gate"] for r in naive["rounds"]],
        "per_round": {k: setups[k]["rounds"] for k in ("naive", "early_stopping_only", "ours")},
    }

if __name__ == "__main__":
    result = asyncio.run(main())
    for setup in ("naive", "early_stopping_only", "ours"):
        for r in result["per_round"][setup]:
            print(f"{setup:19} r{r['round']}: gate {r['gate']:6.2f} -> {r['decision']:8} judged {r['judged']:3}/"
                  f"{r['to_judge']} ({r['batches_judged']}/{r['batches']} batches"
                  f"{', early ' + str(r['interval']) if r['early_stopped'] else ''}) calls {r['calls']:4} "
                  f"cached {r['cached']:3} tokens {r['tokens']}", file=sys.stderr)
    print(json.dumps(result))
