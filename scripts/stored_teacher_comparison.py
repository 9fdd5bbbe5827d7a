"""Distilling from stored teacher outputs on mnist5k: full logits vs top-5 probabilities vs the top-1 label
vs no teacher (the baseline), the same student and recipe, several seeds (README "Stored teacher outputs").

    python scripts/stored_teacher_comparison.py OUT_DIR [--seeds 0 1 2] [--epochs 2] [--teacher-epochs 3] [--lr 1e-3]

One teacher is trained once (paradigm=teacher) and exported three times (logits, topk with k=5, label;
kept when OUT_DIR already holds them, so another student recipe reuses them);
then, for each seed, one offline run per file (the baseline trains in the first and is reused from the
stage cache by the others). Prints a Markdown table of the students' test top-1 (mean and sample std
over the seeds) and writes it, with every run's numbers, to OUT_DIR/comparison_lr<lr>_ep<epochs>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = ["teacher.name=test_resnet"]   # timm's smallest ResNet (0.37M parameters)
STUDENT = ["student.name=test_resnet", "+student.kwargs.channels=[8,16,16,32]", "+student.kwargs.stem_width=8"]
KINDS = {"logits": ["distill=kd"], "topk": ["distill=kd"], "label": ["distill=hard", "alpha=0.5"]}
LABELS = {"logits": "full logits (KD, T=4, alpha=0.9)", "topk": "top-5 probabilities (KD, T=4, alpha=0.9)",
          "label": "top-1 label (hard-label, alpha=0.5)", "baseline": "no teacher (baseline, CE)"}


def kdrun(args: list[str], cwd: Path) -> None:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdrun.cli", *args], cwd=cwd, capture_output=True, text=True)
    print(f"  {time.perf_counter() - started:5.0f} s  kdrun {' '.join(args)}", flush=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="the students' learning rate (AdamW, cosine)")
    options = parser.parse_args()
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["dataset=mnist5k", "progress=false", "tb_figures=0", f"cache_dir={out}/cache", *STUDENT]
    for kind in KINDS:
        if (out / f"teacher_{kind}" / "teacher_outputs.npz").is_file():
            continue
        kdrun([*common, *TEACHER, "paradigm=teacher", f"teacher.epochs={options.teacher_epochs}",
               "teacher.export_outputs=true", f"teacher.export_kind={kind}", f"hydra.run.dir={out}/teacher_{kind}"],
              out)
    teacher = json.loads((out / "teacher_logits" / "metrics.json").read_text())["teacher"]
    results: dict[str, list[float]] = {name: [] for name in LABELS}
    tag = f"lr{options.lr:g}_ep{options.epochs}"
    for seed in options.seeds:
        for kind, method in KINDS.items():
            run = out / f"{tag}_seed{seed}_{kind}"
            kdrun([*common, f"teacher.outputs={out}/teacher_{kind}/teacher_outputs.npz", *method, f"seed={seed}",
                   f"epochs={options.epochs}", f"lr={options.lr}", f"hydra.run.dir={run}"], out)
            metrics = json.loads((run / "metrics.json").read_text())
            results[kind].append(metrics["student"]["top1"])
            if kind == "logits":
                results["baseline"].append(metrics["baseline"]["top1"])
    lines = [f"teacher {teacher['name']}: test top-1 {100 * teacher['top1']:.2f}% ({options.teacher_epochs} epochs); "
             f"students {options.epochs} epochs at lr={options.lr:g}, seeds {options.seeds}", "",
             "| student learns from | test top-1 (mean ± std) | per seed |", "|---|---|---|"]
    for name, label in LABELS.items():
        values = [100 * v for v in results[name]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(values):.2f} ± {spread:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    table = "\n".join(lines)
    print(table)
    (out / f"comparison_{tag}.md").write_text(table + "\n")
    (out / f"comparison_{tag}.json").write_text(json.dumps({"teacher": teacher, "students": results}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
