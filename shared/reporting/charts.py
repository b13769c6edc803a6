"""The report's charts as PNG files: the gated score per round and the training data per round.

They use matplotlib's Agg canvas directly (no pyplot, no global backend switch); matplotlib is imported
only when a chart is drawn, so importing this module stays light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llamaduo.reporting.view import aggregate_names, gate_of, label, num, rounds_of, row_counts, summary_of

SCORE_CHART = "score_per_round.png"
DATA_CHART = "data_per_round.png"


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
    gate, threshold = gate_of(manifest)
    scored = [r for r in rounds_of(manifest) if summary_of(r)]
    xs = [int(r.get("round", i)) for i, r in enumerate(scored)]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = aggregate_names(manifest)
    if gate not in names:
        names.insert(0, gate)
    others = iter(f"C{i}" for i in (1, 2, 4, 5, 6, 7, 8, 9) * 4)  # C0 is the gate's, C3 the threshold's
    for name in names:
        ys = [float((summary_of(r).get("aggregates") or {}).get(name, math.nan)) for r in scored]
        if name == gate:
            ax.plot(xs, ys, marker="o", linewidth=2.5, color="C0", label=f"{label(name)} (gate)", zorder=3)
        else:
            ax.plot(xs, ys, marker=".", linewidth=1.2, linestyle="--", alpha=0.8, color=next(others, "grey"),
                    label=label(name))
    if threshold is not None:
        ax.axhline(float(threshold), color="C3", linestyle=":", linewidth=1.8,
                   label=f"threshold {num(threshold)}")
    if not scored:
        ax.text(0.5, 0.5, "no round scored yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 105)
    ax.set_xlabel("round")
    ax.set_ylabel("score")
    ax.set_title(f"Judge score per round — gate: {label(gate)}")
    if xs:
        ax.set_xticks(xs)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def data_chart(manifest: dict[str, Any], path: Path) -> Path:
    """Training rows per round, stacked: coverage rows and synthetic rows."""
    rounds = rounds_of(manifest)
    xs = [int(r.get("round", i)) for i, r in enumerate(rounds)]
    totals = [row_counts(r) for r in rounds]
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
