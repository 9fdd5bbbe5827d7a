"""report.html: the sweep report as one self-contained page that works offline (opened from file://).

The summary table (sortable by any column; each row links to its runs), the report plots (PNG,
embedded), and per run the soft-target panels of its figure images, drawn in the page from the
logits in the run's soft_targets.json: the image, the teacher at T=1, the soft targets
softmax(teacher logits / T) under a T slider, the student's probabilities at T after each epoch
under an epoch slider with a play button, the true class marked, and KL(soft targets || student).

The page's script and style are small hand-written files beside this module (report_html.js and
report_html.css), inlined with the data: bars, two sliders and a sortable table need no plotting
library, and the page stays tens of kilobytes instead of the megabytes an embedded one adds.
Only the standard library loads here, as in report.py.
"""
from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path
from typing import Optional

from kdrun.run_files import SOFT_TARGETS_FILE, write_text_atomic
from kdrun.sweeps.report import Report, Run, table_cells, spread_note

HTML_FILE = "report.html"


def write_html(report: Report, path: Path, plots: list[Path]) -> None:
    write_text_atomic(render_page(report, plots), path)


def run_name(report: Report, run: Run) -> str:
    """The run's directory under the report's root (the root's own name for a single run)."""
    relative = run.path.relative_to(report.root)
    return str(relative) if relative.parts else (report.root.resolve().name or str(report.root))


def run_anchor(report: Report, run: Run) -> str:
    return f"run-{report.runs.index(run)}"


def read_soft_targets(run_dir: Path) -> tuple[Optional[dict], str]:
    """The run's soft_targets.json, or None and why the page has no panels for it."""
    path = run_dir / SOFT_TARGETS_FILE
    if not path.is_file():
        return None, (f"no {SOFT_TARGETS_FILE}: the run drew no soft-target figures (tb_figures=0; the teacher "
                      "and baseline paradigms, online and multi_teacher draw none; or it has not begun distilling)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, f"{SOFT_TARGETS_FILE} is unreadable ({type(error).__name__}); rerun with resume=true to rewrite it"
    if not (isinstance(data, dict) and data.get("images") and data.get("epochs")):
        return None, f"{SOFT_TARGETS_FILE} holds no images or epochs yet"
    return data, ""


def _percent(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.2f}%"


def run_facts(report: Report, run: Run) -> list[tuple[str, str]]:
    """The short line under a run's heading: swept values, then the accuracies a reader compares."""
    facts = [(key, run.value(key) or "-") for key in report.swept]
    metrics = run.metrics or {}
    for role in ("teacher", "baseline"):
        facts.append((f"{role} top-1", _percent((metrics.get(role) or {}).get("top1"))))
    student = metrics.get("student") or {}
    facts.append(("student top-1 (best / last)", f"{_percent(student.get('best_top1'))} / "
                                                 f"{_percent(student.get('last_top1'))}"))
    gain = metrics.get("gain_over_baseline")
    if isinstance(gain, (int, float)):
        facts.append(("gain", f"{100 * gain:+.2f} points"))
    facts.append(("status", run.status + (f": {run.error}" if run.error else "")))
    return facts


def _table(report: Report) -> str:
    headers, cells = table_cells(report)
    head = "".join(f'<th scope="col" tabindex="0" title="sort by {html.escape(h)}">{html.escape(h)}</th>'
                   for h in headers)
    body = []
    for row, line in zip(report.rows, cells):
        links = ", ".join(f'<a href="#{run_anchor(report, run)}">{html.escape(run_name(report, run))}</a>'
                          for run in row.runs)
        body.append("<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in line) + f"<td>{links}</td></tr>")
    return (f'<div class="table-wrap"><table class="summary sortable"><thead><tr>{head}<th scope="col">runs</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _plots(plots: list[Path]) -> str:
    figures = []
    for plot in plots:
        try:
            encoded = base64.b64encode(plot.read_bytes()).decode("ascii")
        except OSError:
            continue
        name = html.escape(plot.stem.replace("_", " "))
        figures.append(f'<figure class="plot"><img alt="{name}" src="data:image/png;base64,{encoded}">'
                       f"<figcaption>{html.escape(plot.name)}</figcaption></figure>")
    return "".join(figures) or "<p class=\"note\">No plots: no run has completed yet.</p>"


def _run_section(report: Report, run: Run) -> tuple[str, dict]:
    anchor = run_anchor(report, run)
    soft, missing = read_soft_targets(run.path)
    facts = "".join(f"<span><b>{html.escape(k)}</b> {html.escape(v)}</span>" for k, v in run_facts(report, run))
    body = (f'<div class="soft" data-run="{anchor}"></div>' if soft is not None
            else f'<p class="note">{html.escape(missing)}</p>')
    section = (f'<section class="run" id="{anchor}"><h3>{html.escape(run_name(report, run))}'
               f' <a class="back" href="#summary" title="back to the table">&uarr; table</a></h3>'
               f'<p class="facts">{facts}</p>{body}</section>')
    return section, ({"id": anchor, "soft_targets": soft} if soft is not None else {})


def _asset(name: str) -> str:
    return resources.files("kdrun.sweeps").joinpath(name).read_text(encoding="utf-8")


def _script_json(data) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def render_page(report: Report, plots: list[Path]) -> str:
    sections, runs_data = zip(*[_run_section(report, run) for run in report.runs]) if report.runs else ((), ())
    with_panels = [entry for entry in runs_data if entry]
    swept = ", ".join(report.swept) or "nothing"
    note = spread_note(report)
    title = f"kdrun report: {report.root}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_asset("report_html.css")}</style>
</head><body>
<header><h1>{html.escape(title)}</h1>
<p>{len(report.runs)} run(s), swept: {html.escape(swept)}. Accuracies in % on the test split.
{html.escape(note)}</p>
<nav><a href="#summary">table</a> <a href="#plots">plots</a> <a href="#runs">soft targets per run</a></nav></header>
<main>
<h2 id="summary">Summary <small>(click a column to sort)</small></h2>
{_table(report)}
<h2 id="plots">Plots</h2>
<div class="plots">{_plots(plots)}</div>
<h2 id="runs">Soft targets per run</h2>
<p class="help">For a few fixed test images: the teacher's probabilities at T=1, its soft targets
softmax(logits / T) at the T of the slider (the run trained at the T of the button), and the student's
probabilities at that T after each epoch (epoch 0: before training), in %. The true class is orange (&#10003;).
KL is KL(soft targets || student) at that T; the small chart shows it over the epochs.
{'' if with_panels else 'No run here has soft-target data.'}</p>
{"".join(sections)}
</main>
<script type="application/json" id="kdrun-report-data">{_script_json({"runs": with_panels})}</script>
<script>{_asset("report_html.js")}</script>
</body></html>
"""
