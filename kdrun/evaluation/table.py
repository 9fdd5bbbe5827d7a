"""The table printed at the end of every run: one row per model, accuracy, calibration, size and speed."""
from __future__ import annotations

from typing import Optional

from kdrun.evaluation.cost import UNRELIABLE_SPREAD


def _timed(value: str, metrics: dict) -> str:
    """A speed figure, marked `~` when its runs spread too widely to trust it (timing_reliable false)."""
    return value if metrics.get("timing_reliable", True) else f"~{value}"

# (header, width, format of the value): values a row lacks print as "-" (e.g. a combined multi-teacher
# prediction has no latency of its own when its members were not timed together).
COLUMNS = [
    ("top-1", 8, lambda m: f"{100 * m['top1']:.2f}%"),
    ("top-5", 8, lambda m: f"{100 * m['top5']:.2f}%"),
    ("NLL", 7, lambda m: f"{m['nll']:.3f}"),
    ("ECE", 7, lambda m: f"{100 * m['ece']:.2f}%"),
    ("params", 9, lambda m: f"{m['params'] / 1e6:.2f}M"),
    ("MFLOPs", 9, lambda m: f"{m['flops'] / 1e6:.1f}"),
    ("latency", 10, lambda m: _timed(f"{m['latency_ms']:.2f}ms", m)),  # batch 1
    ("img/s", 9, lambda m: _timed(f"{m['throughput']:.0f}", m)),        # at the training batch size
]


def _cell(metrics: dict, width: int, fmt) -> str:
    try:
        text = fmt(metrics)
    except (KeyError, TypeError):
        text = "-"
    return f"{text:>{width}}"


def model_table(rows: list[tuple[str, Optional[dict]]]) -> list[str]:
    """Lines of the table for (label, metrics) rows; rows whose metrics are None are left out."""
    rows = [(label, metrics) for label, metrics in rows if metrics]
    label_width = max(10, *(len(label) + 2 for label, _ in rows))
    name_width = max(len(metrics["name"]) for _, metrics in rows) + 2
    lines = [f"{'':{label_width}}{'model':{name_width}}" + "".join(f"{h:>{w}}" for h, w, _ in COLUMNS)]
    for label, metrics in rows:
        lines.append(f"{label:{label_width}}{metrics['name']:{name_width}}"
                     + "".join(_cell(metrics, width, fmt) for _, width, fmt in COLUMNS))
    if any(metrics.get("timing_reliable") is False for _, metrics in rows):
        lines.append(f"~ timings spread over more than {100 * UNRELIABLE_SPREAD:.0f}% of their median (a busy "
                     "machine?): compare those speeds with care")
    return lines
