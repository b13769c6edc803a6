"""``llamaduo status ID``: the migration's rounds with their scores and decisions (state from the domain)."""

from __future__ import annotations

import argparse
import json

import pytest

from llamaduo.cli import installation
from llamaduo.contracts.events import (
    ArtifactRef,
    EvalScored,
    InferDone,
    Score,
    Subject,
    SynthReady,
    TrainDone,
    start_envelope,
)
from llamaduo.contracts.spec import parse_spec
from llamaduo.contracts.state import DataRefs
from llamaduo.services.controller import domain

SPEC = {"task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"}, "dataset": {"source": "x.jsonl"},
        "student": {"base_model": "tiny:llama", "method": "full"},
        "judge": {"threshold": 90, "early_stopping": False}, "budget": {"max_rounds": 3}}


def two_rounds():
    start = start_envelope("m-status", SPEC)
    state, _ = domain.start(start, parse_spec(SPEC), DataRefs(
        train=ArtifactRef(key="t", rows=8), coverage=ArtifactRef(key="c", rows=4), test=ArtifactRef(key="s", rows=4)))
    for rnd, value in ((0, 60), (1, 95)):
        domain.on_train_done(state, start.follow(Subject.TRAIN_DONE, TrainDone(
            adapter=ArtifactRef(key=f"a{rnd}"), rows=4), round=rnd))
        domain.on_infer_done(state, start.follow(Subject.INFER_DONE, InferDone(
            predictions=ArtifactRef(key="p"), prompts=4, samples_per_prompt=1, batches=1), round=rnd))
        out = domain.on_eval_scored(state, start.follow(Subject.EVAL_SCORED, EvalScored(batch=0, batches=1, scores=[
            Score(item_id=f"i{i}", similarity=value, precision=value) for i in range(4)]), round=rnd))
        if rnd == 0:
            [synth] = [o for o in out if o.type == Subject.SYNTH_REQUEST]
            domain.on_synth_ready(state, synth.follow(Subject.SYNTH_READY, SynthReady(
                dataset=ArtifactRef(key="s1", rows=3), generated=3, kept=3), key="r"))
    return state


def test_status_of_one_migration_lists_its_rounds(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    state = two_rounds()

    async def fake_list_states(settings, migration_id):
        return [state]

    monkeypatch.setattr("llamaduo.bus.client.list_states", fake_list_states)
    monkeypatch.setattr(installation, "load_settings", lambda: None)
    assert installation.cmd_status(argparse.Namespace(id="m-status", json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "m-status: completed (round 1) completed"
    assert lines[1].startswith("  round 0: similarity_mean 60.0 / 90  judged 4/4 (failed 0)")
    assert lines[1].endswith("decision: continue") and lines[2].endswith("decision: pass")
    assert installation.cmd_status(argparse.Namespace(id="m-status", json=True)) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert [(r["round"], r["value"], r["decision"]) for r in row["rounds"]] == [(0, 60.0, "continue"),
                                                                                (1, 95.0, "pass")]
