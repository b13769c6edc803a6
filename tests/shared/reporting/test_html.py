"""The human report: HTML page and PNG charts from a migration manifest."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from llamaduo.reporting.html import DATA_CHART, REPORT_FILE, SCORE_CHART, ReportError, render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MID = "m-report0001"
SIMILARITY = [62.25, 81.5, 91.75]
TRAIN_ROWS = [16, 80, 144]
SYNTH_ROWS = [0, 64, 128]


def _ref(key: str, rows: int | None = None) -> dict[str, Any]:
    return {"key": key, "sha256": "ab" * 32, "rows": rows}


def _usage(calls: int, inp: int, out: int, cost: float, simulated: bool = True) -> dict[str, Any]:
    return {"calls": calls, "input_tokens": inp, "output_tokens": out, "cost": cost, "cached": 0,
            "simulated": simulated}


def make_manifest(task: str = "invoice-extraction", teacher: str = "simulated") -> dict[str, Any]:
    usages = [_usage(3, 1200, 300, 0.0), _usage(20, 15000, 6000, 0.0), _usage(21, 15500, 6100, 0.0)]
    decisions = ["continue", "continue", "pass"]
    rounds = []
    for i in range(3):
        datasets = [_ref(f"migrations/{MID}/data/coverage.jsonl", 16)]
        datasets += [_ref(f"migrations/{MID}/round-{j}/synthetic.jsonl", 64) for j in range(1, i + 1)]
        adapter = _ref(f"migrations/{MID}/round-{i}/adapter")
        rounds.append({
            "round": i,
            "trained_on": datasets,
            "adapter": adapter,
            "predictions": _ref(f"migrations/{MID}/round-{i}/predictions.jsonl", 25),
            "judged_by": "simulated",
            "summary": {
                "round": i, "train_rows": TRAIN_ROWS[i], "synthetic_rows": SYNTH_ROWS[i], "adapter": adapter,
                "train_loss": 1.25 - 0.3 * i,
                "aggregates": {
                    "similarity_mean": SIMILARITY[i], "precision_mean": SIMILARITY[i] - 3,
                    "coverage_50": 72.0 + 12 * i, "coverage_70": 40.0 + 24 * i, "judged": 25.0, "failed": 0.0,
                },
                "judged": 25, "failed_judgements": 0, "gate_metric": "similarity_mean", "threshold": 90.0,
                "decision": decisions[i], "usage": usages[i],
            },
        })
    total = _usage(sum(u["calls"] for u in usages), sum(u["input_tokens"] for u in usages),
                   sum(u["output_tokens"] for u in usages), 0.0)
    return {
        "migration_id": MID,
        "stage": "completed",
        "outcome": "completed",
        "spec": {
            "task": {"name": task, "system_prompt": "x", "oracle": "llamaduo.tasks.invoice:oracle"},
            "student": {"base_model": "smollm2-135m", "method": "lora", "quantization": "none"},
            "teacher": {"provider": teacher, "model": "oracle" if teacher == "simulated" else "gpt-4o"},
            "judge_provider": None,
            "judge": {"gate": "similarity_mean", "threshold": 90.0},
            "budget": {"max_rounds": 3},
        },
        "data": None,
        "rounds": rounds,
        "best_round": 2,
        "usage": total,
    }


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Path, str]:
    page = render_report(make_manifest(), tmp_path / "out")
    return page, page.read_text(encoding="utf-8")


def test_html_has_title_facts_and_per_round_numbers(rendered: tuple[Path, str]) -> None:
    page, text = rendered
    assert page.name == REPORT_FILE and page.exists()
    assert MID in text and "invoice-extraction" in text and "smollm2-135m" in text
    assert "simulated (offline oracle)" in text
    assert "completed" in text
    for sim in SIMILARITY:
        assert f">{sim:.1f}<" in text  # formatted similarity per round, in a table cell
    for rows, synth in zip(TRAIN_ROWS, SYNTH_ROWS, strict=True):
        assert f"<td>{rows}</td><td>{rows - synth}</td><td>{synth}</td>" in text
    assert "90.0" in text  # the threshold
    for decision in ("continue", "pass"):
        assert f">{decision}<" in text


def test_html_has_usage_per_round_and_total(rendered: tuple[Path, str]) -> None:
    _, text = rendered
    assert "<td>1,500</td>" in text          # round 0: 1200 + 300 tokens
    assert "<td>21,000</td>" in text         # round 1
    total_tokens = 1200 + 300 + 15000 + 6000 + 15500 + 6100
    assert re.search(rf'<tr class="total"><td>Total</td><td>44</td>.*?<td>{total_tokens:,}</td>', text)


def test_html_names_final_adapter_and_how_to_serve(rendered: tuple[Path, str]) -> None:
    _, text = rendered
    assert "Final model" in text
    assert f"<code>migrations/{MID}/round-2/adapter</code>" in text
    assert f"llamaduo serve --migration {MID}" in text
    assert "http://127.0.0.1:8000/v1" in text and "from openai import OpenAI" in text


def test_pngs_are_valid_and_inlined(rendered: tuple[Path, str]) -> None:
    page, text = rendered
    for name in (SCORE_CHART, DATA_CHART):
        png = page.parent / name
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert 5_000 < len(data) < 1_000_000
        assert f'href="{name}"' in text  # referenced as a file ...
        assert base64.b64encode(data).decode() in text  # ... and inlined, so the page stands alone
    assert text.count('src="data:image/png;base64,') == 2


def test_values_are_html_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>'
    text = render_report(make_manifest(task=evil), tmp_path).read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


def test_real_teacher_is_named_and_unfinished_migration_renders(tmp_path: Path) -> None:
    m = make_manifest(teacher="openai")
    for r in m["rounds"]:
        r["summary"]["usage"]["simulated"] = False
    m["usage"]["simulated"] = False
    # a fourth round still training: no summary, no adapter yet
    m["rounds"].append({"round": 3, "trained_on": [_ref("c", 16), _ref("s1", 64), _ref("s2", 64), _ref("s3", 64)],
                        "adapter": None, "predictions": None, "judged_by": None, "summary": None})
    m["outcome"], m["stage"] = None, "training"
    text = render_report(m, tmp_path).read_text(encoding="utf-8")
    assert "simulated (offline oracle)" not in text and "openai / gpt-4o" in text
    assert "in progress (training)" in text and "Best model so far" in text
    assert "<td>208</td><td>16</td><td>192</td>" in text  # rows from the datasets it trains on
    assert (tmp_path / SCORE_CHART).read_bytes().startswith(PNG_MAGIC)


def test_write_report_reads_manifest_and_uploads(store: Any, tmp_path: Path) -> None:
    from llamaduo.storage.keys import migration_key

    with pytest.raises(ReportError, match=MID):
        write_report(store, MID, tmp_path / "none")
    store.put_json(migration_key(MID, "manifest.json"), make_manifest())
    page = write_report(store, MID, tmp_path / "out")
    assert page.exists()
    for name in (REPORT_FILE, SCORE_CHART, DATA_CHART):
        key = migration_key(MID, "report", name)
        assert store.get_bytes(key) == (page.parent / name).read_bytes()


def test_html_shows_the_holdout_score_beside_the_gate_score(tmp_path: Path) -> None:
    manifest = make_manifest()
    summary = manifest["rounds"][2]["summary"]
    summary.update(holdout_aggregates={"similarity_mean": 84.25, "judged": 20.0}, holdout_judged=20,
                   holdout_to_judge=20)
    text = render_report(manifest, tmp_path / "out").read_text(encoding="utf-8")
    assert "Holdout" in text and "84.2" in text and "on 20/20 answers" in text and "never used for a decision" in text
    assert "Holdout" not in render_report(make_manifest(), tmp_path / "plain").read_text(encoding="utf-8")
