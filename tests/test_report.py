"""kdrun-report on hand-made run directories: swept keys, seed groups (mean +- std), statuses, files."""
import csv
import json
import os
import statistics
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from kdrun.run_files import holding_run
from kdrun.sweeps.report import build_report, format_table, main, row_seeds, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics(last, best=None, teacher=0.9, baseline=0.7, agreement=0.8, ece=0.05, params=78_000, latency=1.5,
            T=4.0, alpha=0.9):
    return {"status": "completed", "method": "kd", "T": T, "alpha": alpha,
            "teacher": {"top1": teacher}, "baseline": {"top1": baseline} if baseline is not None else None,
            "student": {"top1": last, "last_top1": last, "best_top1": best if best is not None else last,
                        "agreement": agreement, "ece": ece, "params": params, "latency_ms": latency},
            "gain_over_baseline": last - baseline if baseline is not None else None}


def make_run(root: Path, name: str, overrides: list[str], result=None, log: str = "") -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "checkpoints").mkdir()
    if result is not None:
        (run / "metrics.json").write_text(json.dumps(result))
    if log:
        (run / "kdrun.log").write_text(log)
    return run


def assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200


@pytest.fixture
def seed_sweep(tmp_path):
    root = tmp_path / "sweep"
    common = ["dataset=synthetic", "epochs=2"]
    make_run(root, "0_T=1,seed=0", [*common, "T=1", "seed=0"], metrics(0.50, best=0.55, T=1.0))
    make_run(root, "1_T=1,seed=1", [*common, "T=1", "seed=1"], metrics(0.60, best=0.65, T=1.0, latency=2.5))
    make_run(root, "2_T=4,seed=0", [*common, "T=4", "seed=0"], metrics(0.70))
    make_run(root, "3_T=4,seed=1", [*common, "T=4", "seed=1"], metrics(0.80))
    make_run(root, "4_T=8,seed=0", [*common, "T=8", "seed=0"],
             {"status": "diverged", "error": "student diverged in epoch 1/2: loss_kd=nan at step 7; lower the lr"})
    make_run(root, "5_T=8,seed=1", [*common, "T=8", "seed=1"],
             log="[12:00:00] dataset ...\n[12:00:01] job failed: batch_size=999 is larger than the training set\n")
    live = make_run(root, "10_T=2,seed=0", [*common, "T=2", "seed=0"])
    make_run(root, "11_T=2,seed=1", [*common, "T=2", "seed=1"])  # killed: no metrics.json, no process
    with holding_run(live):  # this one is still running: a process holds its lock
        yield root


def test_runs_that_differ_only_in_seed_share_a_row(seed_sweep):
    report = build_report(seed_sweep)
    assert report.swept == ["T", "seed"] and report.grouped_seeds
    assert [(row.keys, len(row.runs), row.status) for row in report.rows] == [
        ({"T": "1"}, 2, "completed"), ({"T": "4"}, 2, "completed"),
        ({"T": "8"}, 1, "diverged"), ({"T": "8"}, 1, "failed"), ({"T": "2"}, 1, "running"),
        ({"T": "2"}, 1, "interrupted")]
    assert [row_seeds(row) for row in report.rows] == ["0,1", "0,1", "0", "1", "0", "1"]
    t1 = report.rows[0].stats
    assert t1["student_last_top1"] == pytest.approx((0.55, statistics.stdev([0.5, 0.6])))
    assert t1["student_best_top1"] == pytest.approx((0.60, statistics.stdev([0.55, 0.65])))
    assert t1["gain"] == pytest.approx((-0.15, statistics.stdev([-0.2, -0.1])))
    assert t1["student_latency_ms"] == pytest.approx((2.0, statistics.stdev([1.5, 2.5])))
    assert t1["teacher_top1"] == (pytest.approx(0.9), pytest.approx(0.0))
    assert report.rows[3].runs[0].error == "batch_size=999 is larger than the training set"
    assert report.rows[4].stats["student_last_top1"] == (None, None)


def test_table_csv_markdown_and_plot_of_a_seed_sweep(seed_sweep):
    text = write_report(seed_sweep)
    lines = text.splitlines()
    assert lines[0] == f"8 run(s) in {seed_sweep} (swept: T, seed)"
    header = lines[1].split()
    assert header[:2] == ["T", "seeds"] and header[-1] == "status"
    t1_row = lines[2].split()
    assert t1_row[:2] == ["1", "0,1"] and "55.00+-7.07" in t1_row and "60.00+-7.07" in t1_row
    assert "-15.00+-7.07" in t1_row and "0.08+-0.00M" in t1_row and t1_row[-1] == "completed"
    assert lines[4].split()[:2] == ["8", "0"] and lines[5].split()[:2] == ["8", "1"] and lines[4].split()[-1] == "diverged"
    assert lines[-2] == "+- is the standard deviation over seeds (seeds column)"
    assert lines[-1].startswith("wrote summary.csv, summary.md, student_top1_vs_T.png")

    rows = list(csv.DictReader((seed_sweep / "summary.csv").open()))
    assert [row["T"] for row in rows] == ["1", "4", "8", "8", "2", "2"]
    assert [row["status"] for row in rows] == ["completed", "completed", "diverged", "failed", "running", "interrupted"]
    assert float(rows[1]["student_last_top1"]) == pytest.approx(0.75)
    assert float(rows[1]["student_last_top1_std"]) == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert rows[0]["runs"] == "2" and rows[0]["seeds"] == "0,1" and rows[0]["paths"] == "0_T=1,seed=0;1_T=1,seed=1"
    assert rows[4]["student_last_top1"] == ""

    markdown = (seed_sweep / "summary.md").read_text()
    assert "| T | seeds | teacher (%) |" in markdown and "| 1 | 0,1 | 90.00+-0.00 |" in markdown
    assert "- `4_T=8,seed=0`: diverged: student diverged in epoch 1/2: loss_kd=nan at step 7" in markdown
    assert_png(seed_sweep / "student_top1_vs_T.png")


def test_lines_per_method_against_alpha_and_bars_for_a_method_only_sweep(tmp_path):
    root = tmp_path / "a"
    for i, (distill, alpha) in enumerate([("kd", "0.5"), ("kd", "0.9"), ("dkd", "0.5"), ("dkd", "0.9")]):
        make_run(root, f"{i}_x", [f"distill={distill}", f"alpha={alpha}"], metrics(0.5 + 0.1 * i, alpha=float(alpha)))
    report = build_report(root)
    assert report.swept == ["distill", "alpha"] and not report.grouped_seeds
    assert [row.stats["student_last_top1"][0] for row in report.rows] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert "wrote summary.csv, summary.md, student_top1_vs_alpha.png" in write_report(root)
    assert_png(root / "student_top1_vs_alpha.png")

    root = tmp_path / "b"
    make_run(root, "0_distill=kd", ["distill=kd"], metrics(0.6))
    make_run(root, "1_distill=dkd", ["distill=dkd"], metrics(0.7, baseline=None))
    assert "student_top1.png" in write_report(root)
    assert_png(root / "student_top1.png")
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert rows[1]["baseline_top1"] == "" and rows[1]["gain"] == ""


def test_a_single_run_directory_is_a_one_row_report(tmp_path):
    run = make_run(tmp_path, "run", ["T=3"], metrics(0.61))
    report = build_report(run)
    assert report.swept == [] and len(report.rows) == 1
    table = format_table(report)
    assert "61.00" in table.splitlines()[2] and "(swept: nothing)" in table


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "no kdrun runs under"),
    (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0], "is not a directory"),
])
def test_a_bad_path_is_a_one_line_error(tmp_path, capsys, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kdrun-report: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "summary.csv").exists()


def test_console_script_is_declared():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kdrun-report"] == "kdrun.sweeps.report:main"
    assert any(dep.startswith("matplotlib") for dep in pyproject["project"]["dependencies"])
    assert "kdrun.sweeps.report" in sys.modules


# --- issue points 5 and 10: a whole outputs/ tree, defaults read from the composed config, repeats, read-only --

def composed_run(root: Path, name: str, overrides: list[str], result=None, T=4.0, seed=0, distill="kd") -> Path:
    """A run as kdrun leaves it: overrides.yaml, plus the composed config and Hydra's group choices."""
    run = make_run(root, name, overrides, result)
    config = {"T": T, "alpha": 0.9, "seed": seed, "epochs": 3, "distill": {"terms": {"kd": {"T": "${T}"}}}}
    (run / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (run / ".hydra" / "hydra.yaml").write_text(json.dumps({"hydra": {"runtime": {"choices": {"distill": distill}}}}))
    return run


def test_values_not_overridden_come_from_the_composed_config(tmp_path):
    outputs = tmp_path / "outputs"
    composed_run(outputs / "runs" / "d1", "t1", [], metrics(0.60))                      # the default T=4
    composed_run(outputs / "runs" / "d1", "t2", ["T=4"], metrics(0.70))                 # T=4 typed
    composed_run(outputs / "runs" / "d2", "t3", ["T=2", "resume=true"], metrics(0.50, T=2.0), T=2.0)
    composed_run(outputs / "multirun" / "d" / "t", "0_distill=dkd", ["distill=dkd"], metrics(0.8), distill="dkd")
    (outputs / "cache" / "teacher" / "abc").mkdir(parents=True)
    report = build_report(outputs)
    assert report.swept == ["distill", "T"]  # resume is never swept
    assert [(row.keys, len(row.runs)) for row in report.rows] == [
        ({"distill": "dkd", "T": "4"}, 1), ({"distill": "kd", "T": "4"}, 2), ({"distill": "kd", "T": "2"}, 1)]
    assert report.rows[1].stats["student_last_top1"][0] == pytest.approx(0.65)
    table = format_table(report)
    assert "-" not in table.splitlines()[3].split()[:2]


def test_repeats_of_one_seed_are_called_repeats_not_seeds(tmp_path):
    composed_run(tmp_path, "a", [], metrics(0.60))
    composed_run(tmp_path, "b", [], metrics(0.70))
    composed_run(tmp_path, "c", ["seed=1"], metrics(0.80), seed=1)
    composed_run(tmp_path, "d", ["T=2"], metrics(0.50, T=2.0), T=2.0)
    report = build_report(tmp_path)
    assert report.swept == ["seed", "T"] and report.grouped_seeds
    assert [(row.keys, row_seeds(row)) for row in report.rows] == [({"T": "4"}, "0x2,1"), ({"T": "2"}, "0")]
    table = format_table(report)
    assert "0x2 = 2 repeats of seed 0" in table.splitlines()[-1]
    assert "over seeds" not in table.replace("not seeds", "")


def test_read_only_directory_prints_the_table_and_one_line(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root, "0_T=1", ["T=1"], metrics(0.5, T=1.0))
    make_run(root, "1_T=2", ["T=2"], metrics(0.6, T=2.0))
    (root / "summary.csv").mkdir()  # what a read-only directory does to the writes, also for root
    main([str(root)])
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"2 run(s) in {root} (swept: T)" and "50.00" in out and "wrote" not in out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"kdrun-report: could not write summary.csv, summary.md and the plots into {root}")
    assert "--out DIR" in err
    assert sorted(p.name for p in root.iterdir()) == ["0_T=1", "1_T=2", "summary.csv"]  # nothing half-written

    elsewhere = tmp_path / "report"
    main([str(root), "--out", str(elsewhere)])
    assert "wrote summary.csv, summary.md" in capsys.readouterr().out
    assert (elsewhere / "summary.md").read_text().startswith(f"# kdrun report: {root}")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_permissions(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root, "0_T=1", ["T=1"], metrics(0.5, T=1.0))
    root.chmod(0o555)
    try:
        main([str(root)])
    finally:
        root.chmod(0o755)
    out, err = capsys.readouterr()
    assert "50.00" in out and "Permission denied" in err and err.count("\n") == 1


def test_deployed_artifacts_get_columns_of_their_own(tmp_path):
    """export=/quantize= runs: top-1, size and latency of each artifact kind some run has, averaged like the rest."""
    def with_int8(last, int8_top1, size, latency, qat=None):
        result = metrics(last)
        result["student"]["size_mb"] = 0.4
        result["student_int8"] = {"top1": int8_top1, "top1_drop": last - int8_top1, "size_mb": size,
                                  "latency_ms": latency}
        if qat is not None:
            result["student_qat"] = {"top1": qat, "top1_drop": last - qat, "size_mb": size, "latency_ms": latency}
        return result

    root = tmp_path / "sweep"
    make_run(root, "0_quantize=int8,seed=0", ["quantize=int8", "seed=0"], with_int8(0.80, 0.78, 0.12, 0.5))
    make_run(root, "1_quantize=int8,seed=1", ["quantize=int8", "seed=1"], with_int8(0.90, 0.84, 0.14, 0.7))
    make_run(root, "2_quantize=none,seed=0", ["quantize=none", "seed=0"], metrics(0.70))
    make_run(root, "3_quantize=qat,seed=0", ["quantize=qat", "seed=0"], with_int8(0.60, 0.55, 0.12, 0.5, qat=0.59))
    report = build_report(root)
    assert [c.name for c in report.columns][-6:] == [
        "student_int8_top1", "student_int8_size_mb", "student_int8_latency_ms",
        "student_qat_top1", "student_qat_size_mb", "student_qat_latency_ms"]
    int8_row = next(row for row in report.rows if row.keys["quantize"] == "int8")
    assert int8_row.stats["student_int8_top1"][0] == pytest.approx(0.81)
    assert int8_row.stats["student_int8_top1"][1] == pytest.approx(statistics.stdev([0.78, 0.84]))
    assert int8_row.stats["student_int8_size_mb"][0] == pytest.approx(0.13)
    none_row = next(row for row in report.rows if row.keys["quantize"] == "none")
    assert none_row.stats["student_int8_top1"] == (None, None)
    header, *lines = format_table(report).splitlines()[1:]
    assert "int8 top-1 (%)" in header and "int8 size" in header and "qat latency" in header
    assert "81.00+-4.24" in lines[0] and "0.13+-0.01MB" in lines[0] and "0.60+-0.14ms" in lines[0]
    write_report(root)
    with open(root / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["student_int8_top1"]) == pytest.approx(0.81)
    assert rows[1]["student_int8_top1"] == "" and float(rows[2]["student_qat_top1"]) == pytest.approx(0.59)
