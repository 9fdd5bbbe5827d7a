"""PNG plots of a sweep report: the student's top-1 against each numeric swept key (T, alpha, ...),
one line per value of the other swept keys (alpha, method, ...), teacher and baseline as references.
With no numeric swept key, one bar per row. matplotlib's object API on the Agg canvas, no pyplot."""
from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Optional

ACCURACY = "student_last_top1"


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def numeric_axes(rows) -> list[str]:
    """Swept keys whose values are all numbers, with at least two of them."""
    keys = list(rows[0].keys) if rows else []
    numbers = {key: [_number(row.keys[key]) for row in rows] for key in keys}
    return [key for key, values in numbers.items() if None not in values and len(set(values)) > 1]


def _reference(rows, column: str) -> Optional[float]:
    values = [row.stats[column][0] for row in rows if row.stats[column][0] is not None]
    return statistics.fmean(values) if values else None


def _label(keys: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in keys.items()) or "student"


def accuracy_plots(report, out_dir: Path) -> list[Path]:
    """Write the plots into `out_dir`; return their paths (none when no run completed)."""
    rows = [row for row in report.rows if row.status == "completed" and row.stats[ACCURACY][0] is not None]
    if not rows:
        return []
    from matplotlib.figure import Figure

    paths = []
    for x_key in numeric_axes(rows):
        figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
        ax = figure.add_subplot()
        lines: dict[tuple, list] = {}
        for row in rows:
            others = tuple((k, v) for k, v in row.keys.items() if k != x_key)
            lines.setdefault(others, []).append(row)
        for others, members in lines.items():
            members.sort(key=lambda row: _number(row.keys[x_key]))
            xs = [_number(row.keys[x_key]) for row in members]
            ys = [100 * row.stats[ACCURACY][0] for row in members]
            errors = [100 * (row.stats[ACCURACY][1] or 0.0) for row in members]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3,
                        label=_label(dict(others)))
        _draw_references(ax, rows)
        xs = sorted({_number(row.keys[x_key]) for row in rows})
        if xs[0] > 0 and xs[-1] / xs[0] >= 4:  # temperatures 1, 2, 4, 8...: even spacing on a log axis
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(x_key)
        ax.set_ylabel("student top-1 (%), last epoch")
        ax.set_title(f"student top-1 vs {x_key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"student_top1_vs_{_safe(x_key)}.png"
        figure.savefig(path)
        paths.append(path)
    if not paths:
        paths.append(_bar_plot(rows, out_dir / "student_top1.png"))
    return paths


def _draw_references(ax, rows) -> None:
    for column, label, style in (("teacher_top1", "teacher", "--"), ("baseline_top1", "baseline", ":")):
        value = _reference(rows, column)
        if value is not None:
            ax.axhline(100 * value, linestyle=style, color="grey" if label == "teacher" else "black", label=label)


def _bar_plot(rows, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4, 0.8 * len(rows) + 2), 4), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    labels = [_label(row.keys) if row.keys else row.runs[0].path.name for row in rows]
    ax.bar(range(len(rows)), [100 * row.stats[ACCURACY][0] for row in rows],
           yerr=[100 * (row.stats[ACCURACY][1] or 0.0) for row in rows], capsize=3)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    _draw_references(ax, rows)
    ax.set_ylabel("student top-1 (%), last epoch")
    ax.legend(fontsize=8)
    figure.savefig(path)
    return path


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", key)
