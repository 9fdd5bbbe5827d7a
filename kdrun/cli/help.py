"""`kdrun --help`: kdrun's own page (Hydra's generic one stays behind `--hydra-help`)."""
from __future__ import annotations

import textwrap

from kdrun.paths import config_groups, group_options

# What each group is for; the options listed under it are its files in conf/ (the model presets, conf/model/,
# are the options of teacher, student and assistant alike).
GROUPS = {
    "teacher": "teacher model preset (or teacher.name=ANY_TIMM_OR_TORCHVISION_NAME)",
    "student": "student model preset, the same set (or student.name=...)",
    "dataset": "training data",
    "distill": "distillation method: its loss terms and their weights",
    "paradigm": "how the models are trained (default offline: teacher, then the student distils)",
    "assistant": "the middle model of paradigm=assistant, a model preset (or assistant.name=...)",
    "optim": "optimizer",
    "sched": "learning-rate schedule",
    "experiment": "a published recipe that sets the values above (the CIFAR-100 pairs of the literature)",
    "recipe": "a training recipe alone (epochs, optimizer, schedule) for any pair: +recipe=cifar100",
    "hparams_search": "an Optuna search space, with -m (needs pip install \"kdrun[optuna]\")",
}

TOP_LEVEL = [
    ("T", "distillation temperature (default 4); paradigm=online has paradigm.T, distill=mlkd its own list"),
    ("alpha", "weight of the distillation term, 1 - alpha weighs hard-label CE (default 0.9)"),
    ("epochs", "epochs of every stage, unless teacher.epochs / student.epochs (default 3)"),
    ("batch_size", "default 64"),
    ("lr", "learning rate of every stage, unless teacher.lr / student.lr (default 1e-3, AdamW)"),
    ("seed", "default 0"),
    ("device", "auto (cuda if present, else cpu), cpu, cuda, cuda:N, mps"),
    ("baseline", "also train the student on hard labels alone (default true)"),
    ("resume", "continue the newest interrupted run (with -m: sweep) with the same overrides (default false)"),
    ("cache_dir", "where reusable teacher and baseline stages live (default outputs/cache)"),
    ("progress", "auto (bars on a terminal, log lines otherwise), true or false"),
    ("tb_figures", "TensorBoard soft-target figures of N test images per epoch; 0: none (default 4)"),
    ("teachers", "paradigm=multi_teacher: e.g. teachers=[resnet50,efficientnet_b0]"),
    ("precision", "fp32 (default), bf16, or fp16 (CUDA): mixed precision of both models"),
    ("channels_last", "NHWC memory layout for convnets (default false)"),
    ("compile", "torch.compile student and teacher (default false)"),
    ("lr_scaling", "none (default) or linear: lr * batch_size / lr_base_batch"),
    ("lr_base_batch", "the batch size `lr` is given for, with lr_scaling=linear (default 64)"),
    ("teacher.cache", "compute the teacher's outputs on the training set once and read them back"),
    ("teacher.checkpoint", "load the teacher from a kdrun checkpoint or a state dict"),
    ("teacher.pretrained", "start the teacher from timm's pretrained weights (needs the hub)"),
]

EXAMPLES = [
    "kdrun teacher=resnet50 student=mobilenetv3 T=3",
    "kdrun student=convnext_atto dataset=digits epochs=5",
    "kdrun teacher.checkpoint=teacher.pt baseline=false",
    "kdrun -m T=1,2,4,8 alpha=0.5,0.9",
    "kdrun -m T=1,2,4,8 hydra/launcher=joblib hydra.launcher.n_jobs=4   # parallel (kdrun[joblib])",
    "kdrun -m T=1,2,4,8 hydra/launcher=kdrun_slurm                      # SLURM (kdrun[slurm])",
    "kdrun -m hparams_search=kd_optuna hydra.sweeper.n_trials=30        # Optuna (kdrun[optuna])",
    "kdrun paradigm=multi_teacher teachers=[resnet50,efficientnet_b0]",
    "kdrun dataset=imagefolder dataset.root=/data/imagenette teacher=resnet50 student=resnet18",
]


def help_text() -> str:
    lines = [
        "kdrun: knowledge distillation in one command.",
        "",
        "A run trains (or loads) the teacher, trains the student baseline on hard labels, distils the",
        "student from the teacher's soft targets, evaluates all three on the test split and prints a",
        "table. Teacher and baseline are cached by config under outputs/cache and reused. Each run",
        "writes .hydra/, kdrun.log, metrics.json, checkpoints/ and TensorBoard events into",
        "outputs/runs/<date>/<time>/ (sweeps: outputs/multirun/...).",
        "",
        "usage: kdrun [-m] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "",
        "Config groups:",
    ]
    groups = {**GROUPS, **{group: "" for group in config_groups() if group not in GROUPS}}  # a new conf/ folder
    for group, meaning in groups.items():
        lines.append(f"  {group:11} {meaning}".rstrip())
        lines += textwrap.wrap(", ".join(group_options(group)), width=100, initial_indent=" " * 16,
                               subsequent_indent=" " * 16, break_on_hyphens=False)
    lines += ["", "Values:"]
    lines += [f"  {key:20} {meaning}" for key, meaning in TOP_LEVEL]
    lines += ["", "Examples:"]
    lines += [f"  {example}" for example in EXAMPLES]
    lines += [
        "",
        "Other flags: -m/--multirun (sweep), --cfg job (print the composed config), --config-dir DIR",
        "(add your own configs), --hydra-help (Hydra's flags). See README.md for metrics.json keys.",
        "",
        "Exit codes: 0 completed, 2 bad input (one line on stderr), 3 training diverged (metrics.json",
        "says where; the last good checkpoint is kept), 1 some jobs of a sweep did not complete.",
    ]
    return "\n".join(lines)
