"""`kdrun-report PATH`: one table for every run under PATH (a sweep dir, or a whole outputs/ tree).

Each run is a directory with `metrics.json` and/or `.hydra/overrides.yaml`. The table shows the swept
keys (overridden keys whose values differ between runs; a run that did not override a key has the value
of its composed config, .hydra/config.yaml), teacher / baseline / student top-1, gain, agreement, ECE,
params, latency, each deployed artifact's top-1, size and latency (export=, quantize=) and status.
Completed runs that differ only in `seed` share a row: mean +- sample standard deviation over their seeds,
or over repeats of one seed (said so: `0x2`). A run without
metrics.json is `running` while a process holds its lock (kdrun/run_files.py), else `interrupted`.
The report is printed and written into PATH (or --out DIR) as summary.csv, summary.md, PNG plots
(report_plots.py) and an interactive report.html (report_html.py). A Hydra callback writes it at the end of every multirun (report_callback.py).

Only the standard library and PyYAML load here (matplotlib when plotting): the report is fast.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from kdrun.errors import KdrunError, one_line
from kdrun.run_files import IGNORED_KEYS, METRICS_FILE, deployed_artifacts, run_is_live, write_text_atomic

CSV_FILE, MARKDOWN_FILE = "summary.csv", "summary.md"
_SKIPPED_DIRS = {".hydra", "checkpoints", "tb", "cache"}
_DIVERGED = re.compile(r"became (nan|inf|-inf)\b", re.IGNORECASE)
_LOGGED_FAILURE = re.compile(r"(?:job failed|error): (.*)")
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: hundreds of runs stay fast


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]        # key -> value, as typed on the command line
    metrics: Optional[dict]          # metrics.json, None while the run has not written it
    status: str                      # completed, failed, diverged, running, interrupted
    error: str = ""
    _composed: dict = field(default_factory=dict, repr=False)   # .hydra/*.yaml, read when first needed

    def value(self, key: str) -> Optional[str]:
        """The run's value of `key`: a group's chosen option, else the composed config's value, else the
        override as typed; None when the run has neither (no .hydra/config.yaml)."""
        choices = self._yaml("hydra.yaml").get("hydra", {}).get("runtime", {}).get("choices") or {}
        if key in choices:
            return None if choices[key] is None else str(choices[key])
        found = _lookup(self._yaml("config.yaml"), key)
        if found is _ABSENT and self.metrics and key in self.metrics and not isinstance(self.metrics[key], dict):
            found = self.metrics[key]  # metrics.json keeps T, alpha, seed, method
        return canonical(found) if found is not _ABSENT else self.overrides.get(key)

    def _yaml(self, name: str) -> dict:
        if name not in self._composed:
            try:
                self._composed[name] = yaml.load((self.path / ".hydra" / name).read_text(), Loader=_Loader) or {}
            except (OSError, yaml.YAMLError):
                self._composed[name] = {}
        return self._composed[name]


_ABSENT = object()


def _lookup(config: dict, key: str, depth: int = 0):
    """config[a][b] for key `a.b`, following `${other.key}` interpolations as Hydra saved them."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    target = _INTERPOLATION.match(node) if isinstance(node, str) else None
    return _lookup(config, target.group(1), depth + 1) if target and depth < 5 else node


def canonical(value) -> str:
    """One text per value, so that `T=4` typed and the default `T: 4.0` read the same."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@dataclass
class Column:
    name: str                        # CSV column
    header: str                      # table header
    value: Callable[[dict], Optional[float]]
    unit: str                        # how the table shows it: %, points, M, ms


def _model(metrics: dict, role: str) -> dict:
    return metrics.get(role) or {}


COLUMNS = [
    Column("teacher_top1", "teacher", lambda m: _model(m, "teacher").get("top1"), "%"),
    Column("baseline_top1", "baseline", lambda m: _model(m, "baseline").get("top1"), "%"),
    Column("student_best_top1", "student best", lambda m: _model(m, "student").get("best_top1"), "%"),
    Column("student_last_top1", "student last", lambda m: _model(m, "student").get("last_top1"), "%"),
    Column("gain", "gain", lambda m: m.get("gain_over_baseline"), "points"),
    Column("agreement", "agreement", lambda m: _model(m, "student").get("agreement"), "%"),
    Column("student_ece", "ECE", lambda m: _model(m, "student").get("ece"), "%"),
    Column("student_params", "params", lambda m: _model(m, "student").get("params"), "M"),
    Column("student_latency_ms", "latency", lambda m: _model(m, "student").get("latency_ms"), "ms"),
]

# The deployed artifacts a run measured (export=, quantize=): metrics.json's `<role>_<kind>` entries, e.g.
# `student_int8`, each with the drop from the PyTorch model it came from. Columns only for kinds some run has.
ARTIFACT_FIELDS = (("top1", "top-1", "%"), ("size_mb", "size", "MB"), ("latency_ms", "latency", "ms"))


def artifact_columns(runs: list["Run"]) -> list[Column]:
    keys = list(dict.fromkeys(key for run in runs if run.metrics for key in deployed_artifacts(run.metrics)))
    return [Column(f"{key}_{field}", f"{key.split('_', 1)[-1]} {header}",
                   lambda m, key=key, field=field: _model(m, key).get(field), unit)
            for key in keys for field, header, unit in ARTIFACT_FIELDS]


@dataclass
class Row:
    keys: dict[str, Optional[str]]                 # swept key -> value (no seed when seeds are grouped)
    runs: list[Run]
    stats: dict[str, tuple[Optional[float], Optional[float]]] = field(default_factory=dict)  # mean, std

    @property
    def status(self) -> str:
        statuses = sorted({run.status for run in self.runs})
        return statuses[0] if len(statuses) == 1 else ", ".join(statuses)


@dataclass
class Report:
    root: Path
    runs: list[Run]
    swept: list[str]                               # keys that differ between runs, in command-line order
    grouped_seeds: bool                            # whether rows average over seeds
    rows: list[Row]
    columns: list[Column] = field(default_factory=lambda: list(COLUMNS))  # COLUMNS + the runs' artifacts


# ---- reading runs -------------------------------------------------------------------------------

def find_runs(root: Path) -> list[Run]:
    """Every run directory under `root` (root itself included), in sweep-job order."""
    found = []
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if set(directory.relative_to(root).parts) & _SKIPPED_DIRS:
            continue
        if (directory / "metrics.json").is_file() or (directory / ".hydra" / "overrides.yaml").is_file():
            found.append(read_run(directory))
    return sorted(found, key=lambda run: _job_order(run.path))


def _job_order(path: Path) -> tuple:
    """Hydra names sweep jobs <n>_<overrides>: order 2_... before 10_..."""
    number = re.match(r"(\d+)_", path.name)
    return (str(path.parent), int(number.group(1)) if number else -1, path.name)


def read_run(path: Path) -> Run:
    overrides = {}
    try:
        items = yaml.load((path / ".hydra" / "overrides.yaml").read_text(), Loader=_Loader) or []
    except (OSError, yaml.YAMLError):
        items = []
    for item in items if isinstance(items, list) else []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+")
        # resume and progress change how a run goes, not its result: never a swept key
        if not key.startswith("~") and key not in IGNORED_KEYS:
            overrides[key] = value
    metrics, error = None, ""
    if (path / METRICS_FILE).is_file():
        try:
            metrics = json.loads((path / METRICS_FILE).read_text())
        except (OSError, ValueError) as exc:
            return Run(path, overrides, None, "failed", f"unreadable metrics.json: {one_line(exc)}")
        error = str(metrics.get("error", ""))
    status = run_status(metrics, error)
    if metrics is None and not run_is_live(path):
        logged = _logged_failure(path / "kdrun.log")
        if logged is not None:
            status, error = ("diverged" if _DIVERGED.search(logged) else "failed"), logged
        else:
            status = "interrupted"  # killed (SIGTERM, SIGKILL, Ctrl-C): resume=true continues it
    return Run(path, overrides, metrics, status, error)


def run_status(metrics: Optional[dict], error: str = "") -> str:
    """completed, failed, diverged (a loss became nan/inf) or running (no metrics.json yet; read_run
    tells a live run from an interrupted one)."""
    if metrics is None:
        return "running"
    status = str(metrics.get("status", "failed"))
    return "diverged" if status == "failed" and _DIVERGED.search(error) else status


def _logged_failure(log_file: Path) -> Optional[str]:
    """A job that failed before writing metrics.json said why in its log."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        return None
    for line in reversed(lines):
        found = _LOGGED_FAILURE.search(line)
        if found:
            return found.group(1)
    return None


# ---- building the table -------------------------------------------------------------------------

def swept_keys(runs: list[Run]) -> list[str]:
    """Overridden keys whose value (typed, or else composed) is not the same in every run, in typed order."""
    order = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in order if len({run.value(key) for run in runs}) > 1]


def build_report(root: Path) -> Report:
    root = Path(root).expanduser()
    if not root.exists():
        raise KdrunError(f"{root} does not exist: pass a run or sweep directory, e.g. kdrun-report outputs/multirun")
    if not root.is_dir():
        raise KdrunError(f"{root} is not a directory: pass a run or sweep directory")
    runs = find_runs(root)
    if not runs:
        raise KdrunError(f"no kdrun runs under {root} (no metrics.json or .hydra/overrides.yaml): "
                         "pass the directory of a run or of a sweep")
    swept = swept_keys(runs)
    row_keys = [key for key in swept if key != "seed"]
    groups: dict[tuple, Row] = {}
    rows: list[Row] = []
    for run in runs:
        if run.status == "completed":  # runs of one config share a row: other seeds, or repeats of one
            group_key = tuple(run.value(key) for key in row_keys)
            if group_key not in groups:
                groups[group_key] = Row(dict(zip(row_keys, group_key)), [])
                rows.append(groups[group_key])
            groups[group_key].runs.append(run)
        else:  # unfinished and failed runs keep a row of their own
            rows.append(Row({key: run.value(key) for key in row_keys}, [run]))
    columns = COLUMNS + artifact_columns(runs)
    for row in rows:
        row.stats = {column.name: _mean_std([column.value(run.metrics) for run in row.runs if run.metrics])
                     for column in columns}
    grouped = any(len(row.runs) > 1 for row in rows)
    if "seed" in swept and not grouped:  # nothing to average: the seed is a plain column
        for row in rows:
            row.keys = {key: row.runs[0].value(key) for key in swept}
    return Report(root, runs, swept, grouped, rows, columns)


def row_seeds(row: Row) -> str:
    """The seeds a row averages: `0,1,2` (other seeds), `0x2` (two repeats of seed 0), `0x2,1` (both)."""
    seeds = [run.value("seed") or "-" for run in row.runs]
    counts = dict.fromkeys(seeds, 0)
    for seed in seeds:
        counts[seed] += 1
    return ",".join(seed if n == 1 else f"{seed}x{n}" for seed, n in counts.items())


def spread_note(report: Report) -> str:
    """What `+-` is over, said plainly: repeats of one seed measure nondeterminism, not seeds."""
    if not report.grouped_seeds:
        return ""
    repeated = any(len({run.value("seed") for run in row.runs}) < len(row.runs) for row in report.rows)
    if repeated:
        return ("+- is the standard deviation over the runs of a row (seeds column: 0,1 = seeds 0 and 1; "
                "0x2 = 2 repeats of seed 0, whose spread is nondeterminism, not seeds)")
    return "+- is the standard deviation over seeds (seeds column)"


def _mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else None)


# ---- writing it ---------------------------------------------------------------------------------

def _show(value: Optional[float], std: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    scale, digits, suffix = {"%": (100, 2, ""), "points": (100, 2, ""), "M": (1e-6, 2, "M"), "ms": (1, 2, "ms"),
                             "MB": (1, 2, "MB")}[unit]
    sign = "+" if unit == "points" else ""
    text = f"{value * scale:{sign}.{digits}f}"
    return f"{text}+-{std * scale:.{digits}f}{suffix}" if std is not None else f"{text}{suffix}"


def table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    key_names = list(report.rows[0].keys) if report.rows else []
    headers = key_names + (["seeds"] if report.grouped_seeds else [])
    headers += [f"{c.header} ({c.unit})" if c.unit in ("%", "points") else c.header for c in report.columns]
    headers += ["status"]
    cells = []
    for row in report.rows:
        line = [row.keys[key] if row.keys[key] is not None else "-" for key in key_names]
        line += [row_seeds(row)] if report.grouped_seeds else []
        line += [_show(*row.stats[c.name], c.unit) for c in report.columns] + [row.status]
        cells.append(line)
    return headers, cells


def format_table(report: Report) -> str:
    headers, cells = table_cells(report)
    widths = [max(len(text) for text in column) for column in zip(headers, *cells)]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in [headers, *cells]]
    swept = ", ".join(report.swept) or "nothing"
    intro = f"{len(report.runs)} run(s) in {report.root} (swept: {swept})"
    note = spread_note(report)
    return "\n".join([intro, *lines, *([note] if note else [])])


def write_markdown(report: Report, path: Path) -> None:
    headers, cells = table_cells(report)
    spread = spread_note(report).replace("+-", "`+-`")
    lines = [f"# kdrun report: {report.root}", "", f"Swept: {', '.join(report.swept) or 'nothing'}. "
             f"Accuracies in %, on the test split{'; ' + spread if spread else ''}.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    failures = [f"- `{run.path.relative_to(report.root)}`: {run.status}: {run.error}" for run in report.runs
                if run.status in ("failed", "diverged")]
    if failures:
        lines += ["", "Failed runs:", *failures]
    write_text_atomic("\n".join(lines) + "\n", path)


def write_csv(report: Report, path: Path) -> None:
    """Plain numbers (accuracies as fractions, as in metrics.json); `<name>_std` over a row's runs."""
    key_names = list(report.rows[0].keys) if report.rows else []
    header = key_names + ["runs", "seeds"] + [name for c in report.columns for name in (c.name, f"{c.name}_std")]
    header += ["status", "paths"]
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(header)
    for row in report.rows:
        stats = [("" if v is None else repr(v)) for c in report.columns for v in row.stats[c.name]]
        paths = ";".join(str(run.path.relative_to(report.root)) for run in row.runs)
        writer.writerow([row.keys[k] or "" for k in key_names] + [len(row.runs), row_seeds(row)] + stats + [row.status, paths])
    write_text_atomic(handle.getvalue(), path)


def write_files(report: Report, out: Path) -> list[str]:
    """summary.csv, summary.md, the plots and report.html into `out`; their names. Raises OSError when `out`
    is not writable."""
    from kdrun.sweeps.report_html import HTML_FILE, write_html
    from kdrun.sweeps.report_plots import accuracy_plots

    out.mkdir(parents=True, exist_ok=True)
    write_csv(report, out / CSV_FILE)
    write_markdown(report, out / MARKDOWN_FILE)
    plots = accuracy_plots(report, out)
    write_html(report, out / HTML_FILE, plots)
    return [CSV_FILE, MARKDOWN_FILE, *(p.name for p in plots), HTML_FILE]


def write_report(root: Path, out: Optional[Path] = None) -> str:
    """Build the report of `root`, write summary.csv, summary.md and plots into `out` (default: `root`);
    return the table."""
    report = build_report(Path(root))
    out = report.root if out is None else Path(out)
    return f"{format_table(report)}\nwrote {', '.join(write_files(report, out))} in {out}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="kdrun-report", description="Summarise every kdrun run under PATH: "
                                     "print a table, write summary.csv, summary.md, PNG plots and report.html into PATH.")
    parser.add_argument("path", help="a run directory, a sweep directory or a tree of them (e.g. outputs)")
    parser.add_argument("--out", metavar="DIR", help="write summary.csv, summary.md and the plots here "
                        "instead of into PATH (e.g. when PATH is read-only)")
    args = parser.parse_args(argv)
    try:
        report = build_report(Path(args.path))
    except KdrunError as error:
        print(f"kdrun-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_table(report), flush=True)  # the table first: it stands even when nothing can be written
    out = report.root if args.out is None else Path(args.out).expanduser()
    try:
        written = write_files(report, out)
    except OSError as error:
        reason = error.strerror or one_line(error)
        print(f"kdrun-report: could not write {CSV_FILE}, {MARKDOWN_FILE} and the plots into {out} ({reason}); "
              "the table above is the whole report; pass --out DIR to write them elsewhere", file=sys.stderr)
        return
    print(f"wrote {', '.join(written)} in {out}")


if __name__ == "__main__":
    main()
