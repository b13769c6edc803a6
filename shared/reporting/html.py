"""The human report of a migration: one self-contained ``report.html`` plus two PNG charts.

Input is the manifest as :func:`llamaduo.reporting.manifest.manifest` writes it (``migrations/{id}/manifest.json``);
the charts are drawn by :mod:`llamaduo.reporting.charts`.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.errors import LlamaDuoError
from llamaduo.reporting.charts import DATA_CHART, SCORE_CHART, data_chart, score_chart
from llamaduo.reporting.view import (
    adapter_of,
    aggregate_names,
    best_round,
    escape,
    gate_of,
    label,
    num,
    rounds_of,
    row_counts,
    spec_of,
    summary_of,
    total_usage,
    usage_of,
)

if TYPE_CHECKING:
    from llamaduo.storage.store import ArtifactStore

__all__ = ["DATA_CHART", "REPORT_FILE", "SCORE_CHART", "ReportError", "render_html", "render_report",
           "serve_snippet", "write_report"]

REPORT_FILE = "report.html"
SERVE_BASE_URL = "http://127.0.0.1:8000/v1"


class ReportError(LlamaDuoError, LookupError):
    """The report cannot be made (for instance: the migration has no manifest)."""


def _int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "—"


def _is_simulated(manifest: dict[str, Any], provider: dict[str, Any]) -> bool:
    if provider.get("provider", "simulated") == "simulated":
        return True
    if total_usage(manifest)["simulated"]:
        return True
    return any(usage_of(summary_of(r).get("usage"))["simulated"] for r in rounds_of(manifest))


def _provider_text(manifest: dict[str, Any], provider: dict[str, Any]) -> str:
    if _is_simulated(manifest, provider):
        return "simulated (offline oracle)"
    name = provider.get("provider") or "?"
    model = provider.get("model")
    return f"{name} / {model}" if model else str(name)


def _student_text(spec: dict[str, Any]) -> str:
    student = spec.get("student") or {}
    base = student.get("base_model") or "?"
    extras = [str(x) for x in (student.get("method"), student.get("quantization")) if x and x != "none"]
    return f"{base} ({', '.join(extras)})" if extras else str(base)


# --------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:70rem;
padding:0 1rem;color:#1d232a;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dl.facts dt{font-weight:600}
dl.facts dd{margin:0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}th{background:#f3f5f7}
td.text,th.text{text-align:left}tr.total td{font-weight:600;background:#fafbfc}
.pass{color:#176f2c;font-weight:600}.stop{color:#a4161a;font-weight:600}.continue{color:#8a5a00}
.outcome-completed{color:#176f2c}.outcome-cancelled{color:#8a5a00}.outcome-failed,.outcome-max_rounds,.outcome-budget{color:#a4161a}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;border-radius:4px}code{font-size:.9rem}
.muted{color:#667}
"""


def _chart_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><a href="{escape(path.name)}"><img src="data:image/png;base64,{data}" alt="{escape(alt)}" '
        f'data-file="{escape(path.name)}"></a>'
        f'<figcaption class="muted">{escape(alt)} — file: <a href="{escape(path.name)}">{escape(path.name)}</a>'
        "</figcaption></figure>"
    )


def _round_table(manifest: dict[str, Any], gate: str) -> str:
    names = aggregate_names(manifest)
    head = ["<th>Round</th>", "<th>Training rows</th>", "<th>Coverage rows</th>", "<th>Synthetic rows</th>",
            "<th>Train loss</th>"]
    head += [f"<th>{escape(label(n))}{' (gate)' if n == gate else ''}</th>" for n in names]
    head += ["<th>Judged</th>", "<th>Failed judgements</th>", '<th class="text">Decision</th>',
             '<th class="text">Adapter</th>']
    body = []
    for rnd in rounds_of(manifest):
        s = summary_of(rnd)
        aggs = s.get("aggregates") or {}
        total, synthetic = row_counts(rnd)
        decision = s.get("decision") or ("in progress" if not s else "—")
        adapter = adapter_of(rnd)
        cells = [escape(rnd.get("round")), _int(total), _int(total - synthetic), _int(synthetic),
                 num(s.get("train_loss"), 4)]
        cells += [num(aggs.get(n)) for n in names]
        cells += [_int(s.get("judged")) if s else "—", _int(s.get("failed_judgements")) if s else "—"]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += f'<td class="text {escape(decision)}">{escape(decision)}</td>'
        row += f'<td class="text"><code>{escape(adapter["key"]) if adapter else "—"}</code></td>'
        body.append(f"<tr>{row}</tr>")
    if not body:
        body.append(f'<tr><td class="text" colspan="{len(head)}">no rounds yet</td></tr>')
    return f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _usage_table(manifest: dict[str, Any]) -> str:
    head = ("<tr><th>Round</th><th>Calls</th><th>Input tokens</th><th>Output tokens</th><th>Tokens</th>"
            "<th>Cached</th><th>Cost</th></tr>")

    def cells(first: str, u: dict[str, Any]) -> str:
        values = [first, _int(u["calls"]), _int(u["input_tokens"]), _int(u["output_tokens"]),
                  _int(u["input_tokens"] + u["output_tokens"]), _int(u["cached"]), num(u["cost"], 4)]
        return "".join(f"<td>{v}</td>" for v in values)

    rows = [f"<tr>{cells(escape(r.get('round')), usage_of(summary_of(r).get('usage')))}</tr>"
            for r in rounds_of(manifest)]
    rows.append(f'<tr class="total">{cells("Total", total_usage(manifest))}</tr>')
    note = ('<p class="muted">Per round: synthesis that fed the round plus judging of it. The total is the '
            "migration's whole service-LLM usage, including work not attached to a scored round.</p>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{note}"


def serve_snippet(migration_id: str) -> str:
    """Plain-text commands to serve the migration's model and call it with the ``openai`` client."""
    return (
        f"llamaduo serve --migration {migration_id}\n"
        "\n"
        "# then, from Python:\n"
        "from openai import OpenAI\n"
        "\n"
        f'client = OpenAI(base_url="{SERVE_BASE_URL}", api_key="unused")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{migration_id}",\n'
        '    messages=[{"role": "user", "content": "..."}],\n'
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def _model_section(manifest: dict[str, Any], migration_id: str) -> str:
    best = best_round(manifest)
    gate, _ = gate_of(manifest)
    if best is None:
        return "<h2>Model</h2><p>No round has produced a scored adapter yet.</p>"
    adapter = adapter_of(best) or {}
    final = manifest.get("outcome") == "completed"
    title = "Final model" if final else "Best model so far"
    score = (summary_of(best).get("aggregates") or {}).get(gate)
    s = summary_of(best)
    holdout, note = (s.get("holdout_aggregates") or {}).get(gate), s.get("holdout_note") or ""
    held = (f"<dt>Holdout {escape(label(gate))}</dt><dd>{num(holdout)} on {escape(s.get('holdout_judged'))}"
            f"/{escape(s.get('holdout_to_judge'))} answers (judged once at the end, never used for a decision)"
            f"{' — ' + escape(note) if note else ''}</dd>") if holdout is not None or note else ""
    sha = adapter.get("sha256")
    return (
        f"<h2>{title}</h2>"
        '<dl class="facts">'
        f"<dt>Round</dt><dd>{escape(best.get('round'))}</dd>"
        f"<dt>{escape(label(gate))}</dt><dd>{num(score)}</dd>"
        + held
        + f"<dt>Adapter key</dt><dd><code>{escape(adapter.get('key'))}</code></dd>"
        + (f"<dt>sha256</dt><dd><code>{escape(sha)}</code></dd>" if sha else "")
        + "</dl>"
        "<h3>How to serve it</h3>"
        f"<pre><code>{escape(serve_snippet(migration_id))}</code></pre>"
    )


def _judge_text(manifest: dict[str, Any], spec: dict[str, Any], judge: dict[str, Any]) -> str:
    judge_spec = spec.get("judge") or {}
    if judge_spec.get("method") == "programmatic":
        return f"programmatic checker {judge_spec.get('checker', 'json_fields')} (no service-LLM calls)"
    return _provider_text(manifest, judge)


def render_html(manifest: dict[str, Any], score_png: Path, data_png: Path) -> str:
    """The report page for ``manifest``, with both charts inlined (and linked to their files)."""
    spec = spec_of(manifest)
    migration_id = str(manifest.get("migration_id") or "?")
    task = (spec.get("task") or {}).get("name") or "?"
    teacher = spec.get("teacher") or {}
    judge = spec.get("judge_provider") or teacher
    gate, threshold = gate_of(manifest)
    outcome = manifest.get("outcome")
    outcome_text = outcome or f"in progress ({manifest.get('stage') or 'unknown stage'})"
    rounds = rounds_of(manifest)
    total = total_usage(manifest)
    facts = [
        ("Migration", migration_id),
        ("Task", task),
        ("Student", _student_text(spec)),
        ("Teacher", _provider_text(manifest, teacher)),
        ("Judge", _judge_text(manifest, spec, judge)),
        ("Gate", f"{label(gate)} ≥ {num(threshold)}"),
        ("Rounds", f"{len(rounds)} (max {(spec.get('budget') or {}).get('max_rounds', '?')})"),
        ("Service tokens", f"{total['input_tokens'] + total['output_tokens']:,}"),
        ("Service cost", num(total["cost"], 4)),
    ]
    facts_html = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)
    facts_html += f'<dt>Outcome</dt><dd class="outcome-{escape(outcome)}"><strong>{escape(outcome_text)}</strong></dd>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>LlamaDuo migration {escape(migration_id)} — {escape(task)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>LlamaDuo migration <code>{escape(migration_id)}</code></h1>"
        f'<p class="muted">Task <strong>{escape(task)}</strong>: {escape(_student_text(spec))} learning from '
        f"{escape(_provider_text(manifest, teacher))} — outcome: <strong>{escape(outcome_text)}</strong></p>"
        f'<dl class="facts">{facts_html}</dl>'
        "<h2>Scores per round</h2>"
        + _chart_html(score_png, f"{label(gate)} per round against the threshold {num(threshold)}")
        + "<h2>Training data per round</h2>"
        + _chart_html(data_png, "training rows per round: coverage and synthetic")
        + "<h2>Rounds</h2>"
        + _round_table(manifest, gate)
        + "<h2>Service-LLM usage</h2>"
        + _usage_table(manifest)
        + _model_section(manifest, migration_id)
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------------------------- entry points


def render_report(manifest: dict[str, Any], out_dir: Path) -> Path:
    """Write ``report.html``, ``score_per_round.png`` and ``data_per_round.png`` into ``out_dir``.

    Returns the path of ``report.html``. The page embeds both charts as base64, so it can be passed
    around on its own; the PNG files sit beside it too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    score_png = score_chart(manifest, out_dir / SCORE_CHART)
    data_png = data_chart(manifest, out_dir / DATA_CHART)
    page = out_dir / REPORT_FILE
    page.write_text(render_html(manifest, score_png, data_png), encoding="utf-8")
    return page


def write_report(store: ArtifactStore, migration_id: str, out_dir: Path) -> Path:
    """Render the report of ``migration_id`` from its stored manifest and upload it.

    Reads ``migrations/{id}/manifest.json``; writes the files into ``out_dir`` and uploads them under
    ``migrations/{id}/report/``. Returns the local ``report.html``. Raises :class:`ReportError` when the
    migration has no manifest.
    """
    from llamaduo.storage.keys import migration_key

    key = migration_key(migration_id, "manifest.json")
    if not store.exists(key):
        raise ReportError(f"migration {migration_id!r} has no manifest ({key} not found in the artifact store)")
    manifest = store.get_json(key)
    page = render_report(manifest, out_dir)
    for name in (REPORT_FILE, SCORE_CHART, DATA_CHART):
        store.put_file(migration_key(migration_id, "report", name), page.parent / name)
    return page
