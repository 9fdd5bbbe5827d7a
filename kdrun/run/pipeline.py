"""One experiment: teacher, baseline, distilled student, evaluation, metrics.json and a result table."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import __version__
from kdrun.config.schema import validate
from kdrun.data import build_dataset, describe
from kdrun.distill import needs_strong_view
from kdrun.engine import distributed
from kdrun.engine.evaluate import predict
from kdrun.engine.precision import build_speed
from kdrun.errors import KdrunError
from kdrun.evaluation.metrics import classification_metrics, fidelity_metrics
from kdrun.evaluation.cost import model_cost, timing_context
from kdrun.models import check_model_name
from kdrun.paradigms import paradigm_name, run_paradigm, unread_settings
from kdrun.engine.seeding import seed_everything
from kdrun.run_files import METRICS_FILE, has_checkpoint, write_json_atomic
from kdrun.stages.roles import RunContext, distill_student, obtain_baseline, obtain_teacher
from kdrun.evaluation.table import model_table
from kdrun.tensorboard.writer import write_run_summary

log = logging.getLogger("kdrun")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise KdrunError(f"device={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdrunError(f"device={name} but no CUDA GPU is visible: use device=cpu or device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KdrunError(f"device={name} but MPS is not available here: use device=cpu or device=auto")
    return device


def show_progress(setting) -> bool:
    setting = str(setting).lower()
    return sys.stderr.isatty() if setting == "auto" else setting == "true"


def run_experiment(cfg: DictConfig, run_dir: Path, overrides: Optional[list[str]] = None) -> dict:
    """Run every stage of the experiment described by `cfg`, writing into `run_dir`.

    `overrides`: the command-line overrides that made `cfg`, kept in metrics.json (a re-run sweep compares them).
    """
    started = time.perf_counter()
    validate(cfg)  # again: callers other than the CLI land here directly
    seed_everything(cfg.seed)
    check_model_name(cfg.teacher.name, "teacher")
    check_model_name(cfg.student.name, "student")
    device = distributed.setup(resolve_device(cfg.device), cfg.device)  # torchrun: this process's device
    distributed.check_batch_size(cfg.batch_size)
    speed = build_speed(cfg.precision, cfg.channels_last, cfg.compile, device)
    run_dir = Path(distributed.from_rank_zero(str(run_dir)))  # rank 0's directory, for resuming
    data = build_dataset(cfg.dataset)
    if cfg.teacher.cache:
        from kdrun.engine.teacher_cache import check_cacheable

        check_cacheable(data.train, data.name)  # before any stage trains
        if needs_strong_view(OmegaConf.to_container(cfg.distill, resolve=True)):
            raise KdrunError("teacher.cache=true cannot serve mlkd's strong views (new random images every step): "
                             "pass teacher.cache=false, or distill.terms.mlkd.augment=false")
    log.info("dataset %s; device %s; kdrun %s", describe(data), device, __version__)
    ctx = RunContext(cfg, data, device, run_dir, show_progress(cfg.progress) and distributed.is_main(), speed,
                     list(overrides or []))
    resume = bool(cfg.resume) or has_checkpoint(run_dir / "checkpoints")
    for note in unread_settings(cfg):
        log.warning(note)
    if paradigm_name(cfg) != "offline":  # teacher, baseline, online, self, multi_teacher, assistant
        return run_paradigm(ctx, started)

    input_shape = (data.in_chans, *data.image_size)

    def cost(model) -> dict:
        return model_cost(model, input_shape, cfg.batch_size, device)

    teacher = obtain_teacher(ctx)
    teacher_logits, labels = predict(teacher.model, data.test, cfg.batch_size, device)
    teacher_metrics = classification_metrics(teacher_logits, labels)
    log.info("teacher %s: test top-1 %.2f%%", cfg.teacher.name, 100 * teacher_metrics["top1"])

    baseline_metrics = None
    if cfg.baseline:
        baseline = obtain_baseline(ctx)
        baseline_metrics = classification_metrics(*predict(baseline.model, data.test, cfg.batch_size, device))
        baseline_metrics.update(name=cfg.student.name, source=baseline.source, path=baseline.path,
                                **cost(baseline.model))
        log.info("baseline %s: test top-1 %.2f%%", cfg.student.name, 100 * baseline_metrics["top1"])

    student = distill_student(ctx, teacher.model, teacher_metrics["top1"], resume)
    student_logits, _ = predict(student.model, data.test, cfg.batch_size, device)
    student_metrics = classification_metrics(student_logits, labels)
    student_metrics.update(fidelity_metrics(student_logits, teacher_logits, cfg.T))
    student_metrics.update(name=cfg.student.name, **cost(student.model),
                           best_top1=student.result.best_top1, best_epoch=student.result.best_epoch,
                           last_top1=student.result.last_top1)
    teacher_metrics.update(name=cfg.teacher.name, source=teacher.source, path=teacher.path, **cost(teacher.model))

    metrics = {
        "status": "completed",
        "kdrun_version": __version__,
        "dataset": {"name": data.name, "num_classes": data.num_classes, "train_size": len(data.train),
                    "test_size": len(data.test)},
        "method": cfg.distill.get("name", "custom"),
        "T": cfg.T,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "device": str(device),
        "overrides": ctx.overrides,
        "teacher": teacher_metrics,
        "baseline": baseline_metrics,
        "student": student_metrics,
        "gain_over_baseline": (student_metrics["top1"] - baseline_metrics["top1"]) if baseline_metrics else None,
        "retained": student_metrics["top1"] / teacher_metrics["top1"] if teacher_metrics["top1"] > 0 else None,
        "compression": teacher_metrics["params"] / student_metrics["params"],
        "speedup": teacher_metrics["latency_ms"] / student_metrics["latency_ms"],
        "timing": timing_context(device),
        "speed": {"precision": speed.precision, "channels_last": speed.channels_last, "compile": speed.compile,
                  "processes": distributed.shard()[1], "teacher_cache": bool(cfg.teacher.cache)},
        "history": student.result.history,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if distributed.is_main():
        write_json_atomic(metrics, run_dir / METRICS_FILE)
        write_run_summary(run_dir, cfg, metrics, {"teacher": teacher_logits, "student": student_logits}, labels)
        print(result_table(metrics))
    return metrics


def result_table(metrics: dict) -> str:
    lines = model_table([("teacher", metrics["teacher"]), ("baseline", metrics["baseline"]),
                         ("distilled", metrics["student"])])
    if metrics["gain_over_baseline"] is not None:
        lines.append(f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points "
                     f"(T={metrics['T']}, alpha={metrics['alpha']}, {metrics['method']})")
    lines.append(fidelity_line(metrics))
    return "\n".join(lines)


def fidelity_line(metrics: dict) -> str:
    """How the student follows the teacher and what it saves: one line under the table."""
    student, retained = metrics["student"], metrics["retained"]
    return (f"student vs teacher: agreement {100 * student['agreement']:.2f}%, KL(T=1) {student['kl_t1']:.4f}, "
            f"KL(T={metrics['T']:g}) {student['kl_T']:.4f}, "
            f"retained {'n/a' if retained is None else f'{100 * retained:.1f}%'}, "
            f"compression {metrics['compression']:.2f}x, speed-up {metrics['speedup']:.2f}x")
