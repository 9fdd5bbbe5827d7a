"""The sweep's TensorBoard run at the end of a multirun (kdrun.tensorboard.sweep_run): the HParams config
from every completed job's hyperparameters (metrics: kdrun.tensorboard.hparams_config's, then the deployed
artifacts' when jobs have them), the report table and plots that kdrun-report wrote."""
from __future__ import annotations

from pathlib import Path

from kdrun.sweeps.report import MARKDOWN_FILE, build_report
from kdrun.tensorboard.sweep_run import write_sweep_run
from kdrun.tensorboard.writer import artifact_scalars, run_hparams


def job_hparams(run_dir: Path, metrics: dict) -> dict:
    """The hyperparameters the job wrote into its own run, recomputed from its saved config and metrics.json."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return run_hparams(cfg, metrics, metrics.get("overrides", []), run_dir.name)


def write_sweep_board(sweep_dir: Path) -> Path:
    """`<sweep dir>/sweep_summary`, after the report (summary.md, plots) is written into the sweep dir."""
    report = build_report(sweep_dir)
    sessions, artifact_metrics = [], {}
    for run in report.runs:
        if run.status == "completed" and (run.path / ".hydra" / "config.yaml").is_file():
            sessions.append(job_hparams(run.path, run.metrics))
            artifact_metrics.update((tag, name) for tag, name, _ in artifact_scalars(run.metrics))
    markdown = sweep_dir / MARKDOWN_FILE
    table = markdown.read_text() if markdown.is_file() else ""
    plots = sorted(sweep_dir.glob("student_top1*.png"))
    return write_sweep_run(sweep_dir, sessions, report.swept, table, plots, artifact_metrics.items())
