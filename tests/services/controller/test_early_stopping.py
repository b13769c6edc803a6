"""Sequential early stopping of judging: the interval, the controller's early close, and judge workers
skipping the batches of a closed round."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest

from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    JudgeItem,
    JudgeRequest,
    MigrationCompleted,
    Score,
    Stage,
    Subject,
    SynthRequest,
    TrainDone,
    Usage,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs, GateStats, MigrationState
from llamaduo.providers.base import Completion, CompletionRequest, Provider
from llamaduo.services.controller import domain
from llamaduo.services.controller.early_stopping import (
    confidence_interval,
    hoeffding_serfling_halfwidth,
    sequential_decision,
)
from llamaduo.services.controller.gate import gate_range, gate_total
from llamaduo.storage.keys import judging_closed_key, spec_key

SPEC = {
    "task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "judge": {"gate": "similarity_mean", "threshold": 90, "batch_size": 10},
    "budget": {"max_rounds": 3},
}
DATA = DataRefs(train=ArtifactRef(key="t", rows=20), coverage=ArtifactRef(key="c", rows=4),
                       test=ArtifactRef(key="s", rows=40))


def scores_of(values, start=0):
    return [Score(item_id=f"i{start + j}", similarity=v, precision=v) for j, v in enumerate(values)]


def decide(scores, gate, threshold, **kwargs):
    """The sequential test on these scores (it reads their statistics, as the controller does)."""
    return sequential_decision(GateStats.from_scores(scores), gate, threshold, **kwargs)


# ------------------------------------------------------------------------------------------ statistics


def test_deterministic_bounds_decide_a_clearly_failing_round():
    # 10 of 40 answers judged, all 1: even if the other 30 score 100 the round mean is 75.25 < 90
    verdict, iv = decide(scores_of([1] * 10), "similarity_mean", 90, to_judge=40, looks=4)
    assert verdict == "below"
    assert iv.high <= (10 * 1 + 30 * 100) / 40 + 1e-9 and iv.low >= 1 and iv.n == 10 and iv.population == 40


def test_interval_contains_the_mean_and_collapses_when_everything_is_judged():
    values = [37.0, 90.0, 100.0, 12.0, 64.0] * 4
    partial = confidence_interval(values[:10], 20, 1, 100, confidence=0.95, looks=2)
    assert partial.low <= partial.mean <= partial.high
    full = confidence_interval(values, 20, 1, 100, confidence=0.95, looks=2)
    assert full.low == pytest.approx(full.mean) == pytest.approx(full.high) == pytest.approx(sum(values) / 20)
    empty = confidence_interval([], 20, 1, 100)
    assert (empty.low, empty.high) == (1, 100)


def test_hoeffding_serfling_width():
    # formula: range * sqrt(log(2/delta) * (1 - (n-1)/N) / (2n))
    w = hoeffding_serfling_halfwidth(10, 40, 99, 0.05 / 4)
    assert w == pytest.approx(99 * math.sqrt(math.log(2 / (0.05 / 4)) * (1 - 9 / 40) / 20))
    widths = [hoeffding_serfling_halfwidth(n, 100, 1, 0.05) for n in (5, 20, 50, 99)]
    assert widths == sorted(widths, reverse=True)  # narrower with more answers
    assert hoeffding_serfling_halfwidth(10, 10_000, 1, 0.05) > hoeffding_serfling_halfwidth(10, 20, 1, 0.05)
    more_looks = hoeffding_serfling_halfwidth(10, 40, 1, 0.05 / 8)
    assert more_looks > hoeffding_serfling_halfwidth(10, 40, 1, 0.05)  # the union bound costs width


def test_min_judged_and_failed_judgements():
    assert decide(scores_of([1] * 9), "similarity_mean", 90, to_judge=40, looks=4,
                               min_judged=10)[0] is None
    failed = [Score(item_id=f"f{i}", failed=True) for i in range(5)]
    verdict, iv = decide(scores_of([1] * 10) + failed, "similarity_mean", 90, to_judge=40,
                                      looks=4, min_judged=10)
    assert verdict == "below" and iv.n == 10 and iv.population == 35  # failed answers leave the population
    assert decide(failed, "similarity_mean", 90, to_judge=40, looks=4, min_judged=1)[0] is None


def test_coverage_gates_use_shares():
    scores = scores_of([10, 55, 75, 95])
    assert [gate_total(GateStats.from_scores([s]), "coverage_50") for s in scores] == [0, 100, 100, 100]
    assert [gate_total(GateStats.from_scores([s]), "coverage_70") for s in scores] == [0, 0, 100, 100]
    assert gate_range("coverage_70") == (0, 100) and gate_range("similarity_mean") == (1, 100)
    verdict, _ = decide(scores_of([100] * 190), "coverage_50", 60, to_judge=200, looks=20)
    assert verdict == "above"


def test_a_clear_pass_is_decided_before_the_end():
    verdicts = []
    for n in range(10, 201, 10):
        verdicts.append(decide(scores_of([100] * n), "similarity_mean", 90, to_judge=200,
                                            looks=20)[0])
    first = verdicts.index("above")
    assert 0 < first < len(verdicts) - 1 and all(v == "above" for v in verdicts[first:])


def test_peeking_after_every_batch_rarely_decides_wrongly():
    """Monte Carlo: populations whose true mean is just on one side of the threshold, answers judged in a
    random order, a look after every batch: a wrong decision at any look must stay below 1 - confidence."""
    rng = random.Random(5)
    threshold, n_pop, batch, reps, confidence = 70.0, 60, 6, 300, 0.8
    wrong = decided = 0
    looks: list[int] = []
    for rep in range(reps):
        above = rep % 2 == 0
        target = threshold + (4 if above else -4)
        # a bimodal population (answers right or wrong) with mean ~target
        pop = [100.0 if rng.random() < (target - 1) / 99 else 1.0 for _ in range(n_pop)]
        true_mean = sum(pop) / n_pop
        rng.shuffle(pop)
        for k in range(1, n_pop // batch + 1):
            verdict, _ = decide(scores_of(pop[: k * batch]), "similarity_mean", threshold,
                                             to_judge=n_pop, looks=n_pop // batch, confidence=confidence,
                                             min_judged=batch)
            if verdict is not None:
                decided += 1
                wrong += (verdict == "above") != (true_mean >= threshold)
                looks.append(k)
                break
    assert wrong / reps <= 1 - confidence
    assert decided == reps  # the last look has judged everything: always decided
    assert sum(looks) / len(looks) < n_pop // batch  # ... and on average earlier


# ------------------------------------------------------------------------------------------ controller


def begin(spec=SPEC):
    start = start_envelope("m-1", spec)
    state, _ = domain.start(start, parse_spec(spec), DATA)
    return start, state


def kinds(outputs):
    return [o.type for o in outputs if o.type != Subject.MIGRATION_PROGRESS]


def trained(state, cause, round, prompts=40, batches=4):
    domain.on_train_done(state, cause.follow(Subject.TRAIN_DONE, TrainDone(
        adapter=ArtifactRef(key=f"a{round}"), rows=4), round=round))
    domain.on_infer_done(state, cause.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=prompts, samples_per_prompt=1, batches=batches), round=round))


def scored(cause, round, batch, values, batches=4, tokens=100, key=None):
    return cause.follow(Subject.EVAL_SCORED, EvalScored(
        batch=batch, batches=batches, scores=scores_of(values, batch * 10),
        usage=Usage(calls=len(values), input_tokens=tokens)), round=round, key=key or f"r{round}b{batch}")


def test_controller_closes_a_failing_round_after_one_batch():
    start, state = begin()
    trained(state, start, 0)
    out = domain.on_eval_scored(state, scored(start, 0, 0, [5] * 10))
    assert kinds(out) == [Subject.SYNTH_REQUEST] and out[-1].round == 1
    assert isinstance(out[-1].payload, SynthRequest)
    rnd = state.rounds[0]
    s = rnd.summary
    assert s.early_stopped and s.decision == "continue" and s.judged == 10 and s.to_judge == 40
    assert s.gate_interval is not None and s.gate_interval[1] < 90 and s.confidence == 0.95
    assert rnd.judging_closed and state.stage == Stage.SYNTHESIS


def test_batches_after_an_early_close_are_ignored_but_their_usage_counts_once():
    start, state = begin()
    trained(state, start, 0)
    domain.on_eval_scored(state, scored(start, 0, 0, [5] * 10))
    before = state.rounds[0].summary.model_copy()
    late = scored(start, 0, 1, [100] * 10, tokens=7)
    assert domain.on_eval_scored(state, late) == []
    assert domain.on_eval_scored(state, scored(start, 0, 1, [100] * 10, tokens=7, key="again")) == []
    assert domain.on_eval_scored(state, scored(start, 0, 0, [100] * 10, key="dup0")) == []
    assert state.rounds[0].summary == before and state.rounds[0].prefix_batches == 1
    assert state.usage.input_tokens == 100 + 7 and state.rounds[0].late_count == 1
    assert state.stage == Stage.SYNTHESIS
    again = MigrationState.model_validate_json(state.model_dump_json())
    assert again == state
    # infer.done arriving after the early close changes nothing either
    domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
        predictions=ArtifactRef(key="p"), prompts=40, samples_per_prompt=1, batches=4), round=0, key="late"))
    assert state.stage == Stage.SYNTHESIS


def test_early_pass_completes_the_migration():
    start, state = begin()
    trained(state, start, 0, prompts=200, batches=20)
    out = []
    for b in range(20):
        out = domain.on_eval_scored(state, scored(start, 0, b, [100] * 10, batches=20))
        if state.done:
            break
    assert kinds(out) == [Subject.MIGRATION_COMPLETED]
    done = out[-1].payload
    assert isinstance(done, MigrationCompleted)
    s = done.rounds[0]
    assert s.early_stopped and s.decision == "pass" and 10 <= s.judged < 200 and s.to_judge == 200
    assert s.gate_interval[0] >= 90
    assert state.rounds[0].judging_closed


def test_without_early_stopping_every_batch_is_judged():
    start, state = begin({**SPEC, "judge": {**SPEC["judge"], "early_stopping": False}})
    trained(state, start, 0)
    for b in range(3):
        assert kinds(domain.on_eval_scored(state, scored(start, 0, b, [5] * 10))) == []
    out = domain.on_eval_scored(state, scored(start, 0, 3, [5] * 10))
    s = state.rounds[0].summary
    assert kinds(out) == [Subject.SYNTH_REQUEST] and not s.early_stopped and s.judged == 40
    assert s.gate_interval is None and not state.rounds[0].judging_closed


def test_batches_scored_before_infer_done_bound_the_round_size():
    start, state = begin()
    domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a0"), rows=4)))
    out = domain.on_eval_scored(state, scored(start, 0, 0, [5] * 10))
    s = state.rounds[0].summary
    assert kinds(out) == [Subject.SYNTH_REQUEST] and s.early_stopped and s.to_judge == 10
    assert s.gate_interval[1] <= (50 + 30 * 100) / 40  # bounded with 4 batches x batch_size 10 answers


def test_an_undecided_round_waits_for_more_batches():
    start, state = begin()
    trained(state, start, 0)
    out = domain.on_eval_scored(state, scored(start, 0, 0, [100] * 5 + [80] * 5))
    assert kinds(out) == [] and state.rounds[0].summary is None and state.stage == Stage.JUDGING


# ------------------------------------------------------------------------------------------ services


class Counting(Provider):
    name = "counting"

    def __init__(self, spec, task) -> None:
        super().__init__(spec, task)
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        return Completion(text=json.dumps({"similarity": 50, "precision": 50, "reason": "ok"}),
                          input_tokens=10, output_tokens=5)


async def _wait(predicate, timeout=15.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_controller_writes_the_marker_and_judges_skip_closed_rounds(settings, monkeypatch, tmp_path):
    """Over a real nats-server and S3 server: the controller closes round 0 after one batch and writes the
    marker; a judge worker then acknowledges the round's batches without a provider call or a reply."""
    from support.bus import Recorder, controller

    from llamaduo.bus.broker import Bus
    from llamaduo.services.judge import app as judge_app
    from llamaduo.storage.store import ArtifactStore
    from llamaduo.tasks.triage import make_dataset

    data = tmp_path / "triage.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_dataset(n_train=12, n_test=40, seed=2)))
    spec = {**SPEC, "dataset": {"source": str(data)}}
    made: list[Counting] = []

    def fake_provider(provider_spec, task):
        made.append(Counting(provider_spec, task))
        return made[-1]

    monkeypatch.setattr(judge_app, "make_provider", fake_provider)
    store = ArtifactStore(settings)
    async with Recorder(settings) as rec:
        ctl = await controller(settings)
        player = Bus(settings, "player")
        await player.broker.connect()
        await player.emit(start_envelope("m-early", spec))
        [req] = await rec.wait_for(Subject.TRAIN_REQUEST, 0)
        await player.emit(req.follow(Subject.TRAIN_DONE, TrainDone(adapter=ArtifactRef(key="a0"), rows=12)))
        await player.emit(req.follow(Subject.INFER_DONE, InferDone(
            predictions=ArtifactRef(key="p0"), prompts=40, samples_per_prompt=1, batches=4)))
        await player.emit(scored(req, 0, 0, [3] * 10))
        await rec.wait_for(Subject.SYNTH_REQUEST, 1)
        assert store.exists(judging_closed_key("m-early", 0))
        assert not store.exists(judging_closed_key("m-early", 1))
        await ctl.broker.stop()

        judge = Bus(settings, "judge")
        judge_app.register(judge, store)
        await judge.broker.start()
        items = [JudgeItem(item_id=f"i{i}", instruction=f"q{i}", reference="a", candidate="b")
                 for i in range(3)]
        for b in (1, 2, 3):
            await player.emit(req.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=b, batches=4, items=items),
                                         key=f"judge-{b}"))
        # a batch of an open round (round 1) is judged: proof that the worker is running
        await player.emit(req.follow(Subject.JUDGE_REQUEST, JudgeRequest(batch=0, batches=1, items=items),
                                     round=1, key="judge-r1"))
        await rec.wait_for(Subject.EVAL_SCORED, 1)
        await asyncio.sleep(0.3)
        await judge.broker.stop()
        await player.broker.stop()
    assert store.get_json(spec_key("m-early"))["judge"]["early_stopping"] is True
    assert [e.payload.batch for e in rec.of(Subject.EVAL_SCORED, 0)] == [0]  # only the test's own batch
    assert sum(p.calls for p in made) == 3  # round 1's three answers; round 0's nine never asked
