"""fp32 vs post-training int8 vs quantization-aware int8 of the same distilled student, over seeds.

    python scripts/qat_table.py                     # mnist5k, cifar:resnet14 -> cifar:resnet8, seeds 0 1 2
    python scripts/qat_table.py --seeds 0 --epochs 1 --qat-epochs 1     # a quick look

The teacher is trained once (paradigm=teacher) and shared; then, for each seed, one `kdrun ... quantize=qat`
run distils the student in fp32, quantizes it after training (ONNX Runtime static int8: `student_int8`) and
fine-tunes it with fake quantization, still distilling, before converting it (`student_qat`): both int8
models come from the same fp32 student. QAT trains --qat-epochs more than PTQ's student, so a control run
gives the fp32 student the same extra epochs without fake quantization (student.checkpoint=its weights,
the same lr and schedule as the QAT epochs), then quantizes it after training: what QAT adds beyond the
extra training. Prints markdown tables; the runs stay in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def kdrun(args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "kdrun.cli", *args], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        sys.exit(f"kdrun {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/qat_table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", default="cifar:resnet14")
    parser.add_argument("--student", default="cifar:resnet8")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="fp32 distillation epochs")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--lr-scale", type=float, default=0.01, help="quantize.lr_scale")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", nargs="*", default=[], help="more kdrun overrides for every run")
    options = parser.parse_args()
    out = options.out.resolve()
    common = ["dataset=mnist5k", f"teacher.name={options.teacher}", f"student.name={options.student}",
              "batch_size=128", "optim=sgd", "lr=0.05", "progress=false", "tb_figures=0",
              f"cache_dir={out / 'cache'}", *options.extra]
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.json").is_file():
        kdrun([*common, "paradigm=teacher", f"teacher.epochs={options.teacher_epochs}",
               f"hydra.run.dir={teacher_dir}"], options.threads)
    checkpoint = teacher_dir / "checkpoints" / "last.pt"
    rows = []
    for seed in options.seeds:
        run_dir = out / f"seed{seed}"
        if not (run_dir / "metrics.json").is_file():
            kdrun([*common, f"teacher.checkpoint={checkpoint}", f"seed={seed}", f"epochs={options.epochs}",
                   "baseline=false", "quantize=qat", f"quantize.epochs={options.qat_epochs}",
                   f"quantize.lr_scale={options.lr_scale}",
                   f"hydra.run.dir={run_dir}"], options.threads)
        control_dir = out / f"seed{seed}_finetuned"  # the same extra epochs in fp32, then PTQ
        if not (control_dir / "metrics.json").is_file():
            kdrun([*common, f"teacher.checkpoint={checkpoint}", f"seed={seed}", f"epochs={options.qat_epochs}",
                   f"lr={0.05 * options.lr_scale}", f"student.checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                   "baseline=false", "quantize=int8", f"hydra.run.dir={control_dir}"], options.threads)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        control = json.loads((control_dir / "metrics.json").read_text())
        rows.append((seed, metrics["teacher"], metrics["student"], metrics["student_int8"], metrics["student_qat"],
                     control["student"], control["student_int8"]))

    print(f"mnist5k, teacher {options.teacher} ({options.teacher_epochs} epochs, once), student {options.student}: "
          f"{options.epochs} fp32 distillation epochs (kd, T=4, alpha=0.9; SGD lr 0.05, batch 128, cosine), then "
          f"PTQ (ONNX Runtime, 512 calibration images) or {options.qat_epochs} QAT epoch(s) at lr {0.05 * options.lr_scale:g}. "
          f"Top-1 on the 1,000 test images; latency: batch 1, one thread.\n")
    print(f"| seed | teacher | fp32 student | int8 PTQ | int8 QAT | QAT - PTQ | fp32 +{options.qat_epochs} epoch(s) "
          f"| its int8 PTQ | QAT - that PTQ |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed, teacher, student, ptq, qat, tuned, tuned_ptq in rows:
        print(f"| {seed} | {100 * teacher['top1']:.2f}% | {100 * student['top1']:.2f}% | {100 * ptq['top1']:.2f}% | "
              f"{100 * qat['top1']:.2f}% | {100 * (qat['top1'] - ptq['top1']):+.2f} | {100 * tuned['top1']:.2f}% | "
              f"{100 * tuned_ptq['top1']:.2f}% | {100 * (qat['top1'] - tuned_ptq['top1']):+.2f} |")
    column = {name: [row[i]["top1"] for row in rows] for i, name in
              ((1, "teacher"), (2, "fp32"), (3, "ptq"), (4, "qat"), (5, "tuned"), (6, "tuned_ptq"))}
    gain = [q - p for q, p in zip(column["qat"], column["ptq"])]
    gain_tuned = [q - p for q, p in zip(column["qat"], column["tuned_ptq"])]
    print(f"| mean ± sd | {mean_sd(column['teacher'], 100)}% | {mean_sd(column['fp32'], 100)}% | "
          f"{mean_sd(column['ptq'], 100)}% | {mean_sd(column['qat'], 100)}% | {mean_sd(gain, 100)} | "
          f"{mean_sd(column['tuned'], 100)}% | {mean_sd(column['tuned_ptq'], 100)}% | {mean_sd(gain_tuned, 100)} |\n")
    print("| model | size (MB) | latency (ms) | throughput (img/s) |")
    print("| --- | --- | --- | --- |")
    for i, name in ((2, "fp32 student (PyTorch)"), (3, "int8 PTQ (ONNX Runtime)"), (4, "int8 QAT (ONNX Runtime)")):
        print(f"| {name} | {mean_sd([r[i]['size_mb'] for r in rows], digits=3)} | "
              f"{mean_sd([r[i]['latency_ms'] for r in rows])} | {mean_sd([r[i]['throughput'] for r in rows], digits=0)} |")


if __name__ == "__main__":
    main()
