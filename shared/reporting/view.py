"""Reading a migration manifest (``manifest.json`` as :func:`llamaduo.reporting.manifest.manifest` writes it)
for the report: tolerant accessors shared by the HTML page and the charts.

Manifests are read back from the store, possibly by a newer version than wrote them, so every accessor
copes with a missing or null field.
"""

from __future__ import annotations

import html
import math
from typing import Any

#: Score aggregates in display order; any other non-count aggregate follows these.
SCORE_AGGREGATES = ("similarity_mean", "precision_mean", "coverage_50", "coverage_70")
#: Aggregates that are counts, not scores (shown as their own columns, never charted).
COUNT_AGGREGATES = ("judged", "failed")
_LABELS = {
    "similarity_mean": "similarity (mean)",
    "precision_mean": "precision (mean)",
    "coverage_50": "coverage ≥50 (%)",
    "coverage_70": "coverage ≥70 (%)",
}


def escape(value: Any) -> str:
    """HTML-escape any value (None becomes an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def num(value: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals; an em dash for None or NaN."""
    if value is None:
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return escape(value)
    return "—" if math.isnan(f) else f"{f:.{digits}f}"


def label(name: str) -> str:
    """The display name of an aggregate."""
    return _LABELS.get(name, name)


def spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The spec the migration ran with (empty if absent)."""
    spec = manifest.get("spec")
    return spec if isinstance(spec, dict) else {}


def rounds_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds, in order."""
    return [r for r in manifest.get("rounds") or [] if isinstance(r, dict)]


def summary_of(rnd: dict[str, Any]) -> dict[str, Any]:
    """A round's summary (empty until the round is judged)."""
    s = rnd.get("summary")
    return s if isinstance(s, dict) else {}


def gate_of(manifest: dict[str, Any]) -> tuple[str, float | None]:
    """Gate metric and threshold: from the round summaries, else from the spec."""
    for rnd in rounds_of(manifest):
        s = summary_of(rnd)
        if s.get("gate_metric"):
            return str(s["gate_metric"]), s.get("threshold")
    judge = spec_of(manifest).get("judge") or {}
    return str(judge.get("gate") or "similarity_mean"), judge.get("threshold")


def aggregate_names(manifest: dict[str, Any]) -> list[str]:
    """The score aggregates present in any round: the known ones first, in display order."""
    present: list[str] = []
    for rnd in rounds_of(manifest):
        for k in (summary_of(rnd).get("aggregates") or {}):
            if k not in present and k not in COUNT_AGGREGATES:
                present.append(k)
    known = [k for k in SCORE_AGGREGATES if k in present]
    return known + [k for k in present if k not in known]


def row_counts(rnd: dict[str, Any]) -> tuple[int, int]:
    """(training rows, synthetic rows) of a round: from its summary, else from the datasets it trained on."""
    s = summary_of(rnd)
    if s:
        return int(s.get("train_rows") or 0), int(s.get("synthetic_rows") or 0)
    trained = [d for d in rnd.get("trained_on") or [] if isinstance(d, dict)]
    total = sum(int(d.get("rows") or 0) for d in trained)
    coverage = int(trained[0].get("rows") or 0) if trained else 0
    return total, total - coverage


def usage_of(u: Any) -> dict[str, Any]:
    """A usage mapping with every field present."""
    u = u if isinstance(u, dict) else {}
    return {
        "calls": int(u.get("calls") or 0),
        "input_tokens": int(u.get("input_tokens") or 0),
        "output_tokens": int(u.get("output_tokens") or 0),
        "cached": int(u.get("cached") or 0),
        "cost": float(u.get("cost") or 0.0),
        "simulated": bool(u.get("simulated")),
    }


def total_usage(manifest: dict[str, Any]) -> dict[str, Any]:
    """The migration's whole service-LLM usage (else the sum over the rounds)."""
    if isinstance(manifest.get("usage"), dict):
        return usage_of(manifest["usage"])
    total = usage_of(None)
    for rnd in rounds_of(manifest):
        u = usage_of(summary_of(rnd).get("usage"))
        for k in ("calls", "input_tokens", "output_tokens", "cached", "cost"):
            total[k] += u[k]
        total["simulated"] = total["simulated"] or u["simulated"]
    return total


def adapter_of(rnd: dict[str, Any]) -> dict[str, Any] | None:
    """A round's adapter reference, or None before it is trained."""
    a = rnd.get("adapter") or summary_of(rnd).get("adapter")
    return a if isinstance(a, dict) and a.get("key") else None


def best_round(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The round whose adapter the migration hands over, as the manifest records it (``best_round``)."""
    number = manifest.get("best_round")
    if number is None:
        return None
    return next((r for r in rounds_of(manifest) if r.get("round") == number), None)
