"""The human report of a migration: one self-contained ``report.html`` plus two PNG charts.

Input is the manifest as :func:`llamaduo.reporting.manifest.manifest` writes it (``migrations/{id}/manifest.json``).
Charts use matplotlib's Agg canvas directly (no pyplot, no global backend switch); matplotlib is imported
only when a chart is drawn, so importing this module stays light.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"
SCORE_CHART = "score_per_round.png"
DATA_CHART = "data_per_round.png"
SERVE_BASE_URL = "http://127.0.0.1:8000/v1"

#: Score aggregates in display order; any other non-count aggregate follows these.
_SCORE_AGGREGATES = ("similarity_mean", "precision_mean", "coverage_50", "coverage_70")
#: Aggregates that are counts, not scores (shown as their own columns, never charted).
_COUNT_AGGREGATES = ("judged", "failed")
_LABELS = {
    "similarity_mean": "similarity (mean)",
    "precision_mean": "precision (mean)",
    "coverage_50": "coverage ≥50 (%)",
    "coverage_70": "coverage ≥70 (%)",
}


class ReportError(LookupError):
    """The report cannot be made (for instance: the migration has no manifest)."""


# --------------------------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    """HTML-escape any value (None becomes an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "—" if math.isnan(f) else f"{f:.{digits}f}"


def _int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "—"


def _label(name: str) -> str:
    return _LABELS.get(name, name)


def _spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest.get("spec")
    return spec if isinstance(spec, dict) else {}


def _rounds(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in manifest.get("rounds") or [] if isinstance(r, dict)]


def _summary(rnd: dict[str, Any]) -> dict[str, Any]:
    s = rnd.get("summary")
    return s if isinstance(s, dict) else {}


def _gate(manifest: dict[str, Any]) -> tuple[str, float | None]:
    """Gate metric and threshold: from the round summaries, else from the spec."""
    for rnd in _rounds(manifest):
        s = _summary(rnd)
        if s.get("gate_metric"):
            return str(s["gate_metric"]), s.get("threshold")
    judge = _spec(manifest).get("judge") or {}
    return str(judge.get("gate") or "similarity_mean"), judge.get("threshold")


def _aggregate_names(manifest: dict[str, Any]) -> list[str]:
    present: list[str] = []
    for rnd in _rounds(manifest):
        for k in (_summary(rnd).get("aggregates") or {}):
            if k not in present and k not in _COUNT_AGGREGATES:
                present.append(k)
    known = [k for k in _SCORE_AGGREGATES if k in present]
    return known + [k for k in present if k not in known]


def _rows(rnd: dict[str, Any]) -> tuple[int, int]:
    """(training rows, synthetic rows) of a round: from its summary, else from the datasets it trained on."""
    s = _summary(rnd)
    if s:
        return int(s.get("train_rows") or 0), int(s.get("synthetic_rows") or 0)
    trained = [d for d in rnd.get("trained_on") or [] if isinstance(d, dict)]
    total = sum(int(d.get("rows") or 0) for d in trained)
    coverage = int(trained[0].get("rows") or 0) if trained else 0
    return total, total - coverage


def _usage(u: Any) -> dict[str, Any]:
    u = u if isinstance(u, dict) else {}
    return {
        "calls": int(u.get("calls") or 0),
        "input_tokens": int(u.get("input_tokens") or 0),
        "output_tokens": int(u.get("output_tokens") or 0),
        "cached": int(u.get("cached") or 0),
        "cost": float(u.get("cost") or 0.0),
        "simulated": bool(u.get("simulated")),
    }


def _total_usage(manifest: dict[str, Any]) -> dict[str, Any]:
    if isinstance(manifest.get("usage"), dict):
        return _usage(manifest["usage"])
    total = _usage(None)
    for rnd in _rounds(manifest):
        u = _usage(_summary(rnd).get("usage"))
        for k in ("calls", "input_tokens", "output_tokens", "cached", "cost"):
            total[k] += u[k]
        total["simulated"] = total["simulated"] or u["simulated"]
    return total


def _adapter(rnd: dict[str, Any]) -> dict[str, Any] | None:
    a = rnd.get("adapter") or _summary(rnd).get("adapter")
    return a if isinstance(a, dict) and a.get("key") else None


def best_round(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The round whose adapter the migration hands over: highest gated score, earliest on a tie.

    Same rule as ``MigrationState.best_round``; rounds without a summary or an adapter do not count.
    """
    gate, _ = _gate(manifest)
    scored = [r for r in _rounds(manifest) if _summary(r) and _adapter(r)]
    if not scored:
        return None
    return max(scored, key=lambda r: (float((_summary(r).get("aggregates") or {}).get(gate, 0.0)),
                                      -int(r.get("round", 0))))


def _is_simulated(manifest: dict[str, Any], provider: dict[str, Any]) -> bool:
    if provider.get("provider", "simulated") == "simulated":
        return True
    if _total_usage(manifest)["simulated"]:
        return True
    return any(_usage(_summary(r).get("usage"))["simulated"] for r in _rounds(manifest))


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


# --------------------------------------------------------------------------------------------- charts


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def score_chart(manifest: dict[str, Any], path: Path) -> Path:
    """Gated score per round (bold) with the threshold line; the other aggregates as thinner lines."""
    gate, threshold = _gate(manifest)
    scored = [r for r in _rounds(manifest) if _summary(r)]
    xs = [int(r.get("round", i)) for i, r in enumerate(scored)]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = _aggregate_names(manifest)
    if gate not in names:
        names.insert(0, gate)
    others = iter(f"C{i}" for i in (1, 2, 4, 5, 6, 7, 8, 9) * 4)  # C0 is the gate's, C3 the threshold's
    for name in names:
        ys = [float((_summary(r).get("aggregates") or {}).get(name, math.nan)) for r in scored]
        if name == gate:
            ax.plot(xs, ys, marker="o", linewidth=2.5, color="C0", label=f"{_label(name)} (gate)", zorder=3)
        else:
            ax.plot(xs, ys, marker=".", linewidth=1.2, linestyle="--", alpha=0.8, color=next(others, "grey"),
                    label=_label(name))
    if threshold is not None:
        ax.axhline(float(threshold), color="C3", linestyle=":", linewidth=1.8,
                   label=f"threshold {_num(threshold)}")
    if not scored:
        ax.text(0.5, 0.5, "no round scored yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 105)
    ax.set_xlabel("round")
    ax.set_ylabel("score")
    ax.set_title(f"Judge score per round — gate: {_label(gate)}")
    if xs:
        ax.set_xticks(xs)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def data_chart(manifest: dict[str, Any], path: Path) -> Path:
    """Training rows per round, stacked: coverage rows and synthetic rows."""
    rounds = _rounds(manifest)
    xs = [int(r.get("round", i)) for i, r in enumerate(rounds)]
    totals = [_rows(r) for r in rounds]
    synthetic = [s for _, s in totals]
    coverage = [t - s for t, s in totals]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(xs, coverage, color="C0", label="coverage split")
    ax.bar(xs, synthetic, bottom=coverage, color="C1", label="synthetic")
    for x, (t, _) in zip(xs, totals, strict=True):
        ax.annotate(str(t), (x, t), ha="center", va="bottom", fontsize="small")
    if not rounds:
        ax.text(0.5, 0.5, "no rounds yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xticks(xs)
        ax.set_ylim(0, max(1, max(t for t, _ in totals)) * 1.15)
    ax.set_xlabel("round")
    ax.set_ylabel("training rows")
    ax.set_title("Training data per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


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
.outcome-completed{color:#176f2c}.outcome-failed,.outcome-max_rounds,.outcome-budget{color:#a4161a}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;border-radius:4px}code{font-size:.9rem}
.muted{color:#667}
"""


def _chart_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><a href="{_e(path.name)}"><img src="data:image/png;base64,{data}" alt="{_e(alt)}" '
        f'data-file="{_e(path.name)}"></a>'
        f'<figcaption class="muted">{_e(alt)} — file: <a href="{_e(path.name)}">{_e(path.name)}</a>'
        "</figcaption></figure>"
    )


def _round_table(manifest: dict[str, Any], gate: str) -> str:
    names = _aggregate_names(manifest)
    head = ["<th>Round</th>", "<th>Training rows</th>", "<th>Coverage rows</th>", "<th>Synthetic rows</th>",
            "<th>Train loss</th>"]
    head += [f"<th>{_e(_label(n))}{' (gate)' if n == gate else ''}</th>" for n in names]
    head += ["<th>Judged</th>", "<th>Failed judgements</th>", '<th class="text">Decision</th>',
             '<th class="text">Adapter</th>']
    body = []
    for rnd in _rounds(manifest):
        s = _summary(rnd)
        aggs = s.get("aggregates") or {}
        total, synthetic = _rows(rnd)
        decision = s.get("decision") or ("in progress" if not s else "—")
        adapter = _adapter(rnd)
        cells = [_e(rnd.get("round")), _int(total), _int(total - synthetic), _int(synthetic),
                 _num(s.get("train_loss"), 4)]
        cells += [_num(aggs.get(n)) for n in names]
        cells += [_int(s.get("judged")) if s else "—", _int(s.get("failed_judgements")) if s else "—"]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += f'<td class="text {_e(decision)}">{_e(decision)}</td>'
        row += f'<td class="text"><code>{_e(adapter["key"]) if adapter else "—"}</code></td>'
        body.append(f"<tr>{row}</tr>")
    if not body:
        body.append(f'<tr><td class="text" colspan="{len(head)}">no rounds yet</td></tr>')
    return f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _usage_table(manifest: dict[str, Any]) -> str:
    head = ("<tr><th>Round</th><th>Calls</th><th>Input tokens</th><th>Output tokens</th><th>Tokens</th>"
            "<th>Cached</th><th>Cost</th></tr>")

    def cells(label: str, u: dict[str, Any]) -> str:
        values = [label, _int(u["calls"]), _int(u["input_tokens"]), _int(u["output_tokens"]),
                  _int(u["input_tokens"] + u["output_tokens"]), _int(u["cached"]), _num(u["cost"], 4)]
        return "".join(f"<td>{v}</td>" for v in values)

    rows = [f"<tr>{cells(_e(r.get('round')), _usage(_summary(r).get('usage')))}</tr>" for r in _rounds(manifest)]
    rows.append(f'<tr class="total">{cells("Total", _total_usage(manifest))}</tr>')
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
    gate, _ = _gate(manifest)
    if best is None:
        return "<h2>Model</h2><p>No round has produced a scored adapter yet.</p>"
    adapter = _adapter(best) or {}
    final = manifest.get("outcome") == "completed"
    title = "Final model" if final else "Best model so far"
    score = (_summary(best).get("aggregates") or {}).get(gate)
    sha = adapter.get("sha256")
    return (
        f"<h2>{title}</h2>"
        '<dl class="facts">'
        f"<dt>Round</dt><dd>{_e(best.get('round'))}</dd>"
        f"<dt>{_e(_label(gate))}</dt><dd>{_num(score)}</dd>"
        f"<dt>Adapter key</dt><dd><code>{_e(adapter.get('key'))}</code></dd>"
        + (f"<dt>sha256</dt><dd><code>{_e(sha)}</code></dd>" if sha else "")
        + "</dl>"
        "<h3>How to serve it</h3>"
        f"<pre><code>{_e(serve_snippet(migration_id))}</code></pre>"
    )


def _judge_text(manifest: dict[str, Any], spec: dict[str, Any], judge: dict[str, Any]) -> str:
    judge_spec = spec.get("judge") or {}
    if judge_spec.get("method") == "programmatic":
        return f"programmatic checker {judge_spec.get('checker', 'json_fields')} (no service-LLM calls)"
    return _provider_text(manifest, judge)


def render_html(manifest: dict[str, Any], score_png: Path, data_png: Path) -> str:
    """The report page for ``manifest``, with both charts inlined (and linked to their files)."""
    spec = _spec(manifest)
    migration_id = str(manifest.get("migration_id") or "?")
    task = (spec.get("task") or {}).get("name") or "?"
    teacher = spec.get("teacher") or {}
    judge = spec.get("judge_provider") or teacher
    gate, threshold = _gate(manifest)
    outcome = manifest.get("outcome")
    outcome_text = outcome or f"in progress ({manifest.get('stage') or 'unknown stage'})"
    rounds = _rounds(manifest)
    total = _total_usage(manifest)
    facts = [
        ("Migration", migration_id),
        ("Task", task),
        ("Student", _student_text(spec)),
        ("Teacher", _provider_text(manifest, teacher)),
        ("Judge", _judge_text(manifest, spec, judge)),
        ("Gate", f"{_label(gate)} ≥ {_num(threshold)}"),
        ("Rounds", f"{len(rounds)} (max {(spec.get('budget') or {}).get('max_rounds', '?')})"),
        ("Service tokens", f"{total['input_tokens'] + total['output_tokens']:,}"),
        ("Service cost", _num(total["cost"], 4)),
    ]
    facts_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    facts_html += f'<dt>Outcome</dt><dd class="outcome-{_e(outcome)}"><strong>{_e(outcome_text)}</strong></dd>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>LlamaDuo migration {_e(migration_id)} — {_e(task)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>LlamaDuo migration <code>{_e(migration_id)}</code></h1>"
        f'<p class="muted">Task <strong>{_e(task)}</strong>: {_e(_student_text(spec))} learning from '
        f"{_e(_provider_text(manifest, teacher))} — outcome: <strong>{_e(outcome_text)}</strong></p>"
        f'<dl class="facts">{facts_html}</dl>'
        "<h2>Scores per round</h2>"
        + _chart_html(score_png, f"{_label(gate)} per round against the threshold {_num(threshold)}")
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


def write_report(store: Any, migration_id: str, out_dir: Path) -> Path:
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
