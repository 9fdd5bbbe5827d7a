"""`kdrun --help`: kdrun's own page (Hydra's generic one stays behind `--hydra-help`); `kdrun --help TOPIC`:
a section of the README.

The README is the documentation, and it reaches pip users too: it is the package's long description, which
pip installs in the package's metadata (METADATA), so `kdrun --help metrics.json` works offline and from
any install, with no docs folder to ship and no URL to keep alive. A source checkout reads its own README.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import textwrap
from pathlib import Path
from typing import Optional

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
    "quantize": "the shipped model: none, int8 (ONNX Runtime, after training) or qat (quantization-aware; kdrun[deploy])",
    "prune": "the student pruned by channels (Torch-Pruning): none, teacher, student, distilled; prune.ratio=0.5",
    "experiment": "a published recipe that sets the values above (the CIFAR-100 and ImageNet pairs of the literature)",
    "recipe": "a training recipe alone (epochs, optimizer, schedule) for any pair: +recipe=cifar100 or +recipe=imagenet",
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
    ("export", "onnx, program (torch.export), torchscript or a list, e.g. export=[onnx,program]: RUN_DIR/export/"),
    ("teacher.cache", "compute the teacher's outputs on the training set once and read them back"),
    ("teacher.checkpoint", "load the teacher from a kdrun checkpoint or a state dict"),
    ("teacher.pretrained", "start the teacher from timm's pretrained weights (needs the hub)"),
]

EXAMPLES = [
    "kdrun teacher=resnet50 student=mobilenetv3 T=3",
    "kdrun student=convnext_atto dataset=digits epochs=5",
    "kdrun teacher.checkpoint=teacher.pt baseline=false",
    "kdrun dataset=mnist5k export=onnx quantize=int8                   # ship it (kdrun[deploy])",
    "kdrun -m T=1,2,4,8 alpha=0.5,0.9",
    "kdrun -m prune.ratio=0.25,0.5 teacher=resnet18                     # prune, then distil (kdrun[prune])",
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
        "(add your own configs), --hydra-help (Hydra's flags).",
        "",
        "Documentation: kdrun --help TOPIC prints that section of the README, which is installed with",
        "kdrun: e.g. kdrun --help metrics.json (its keys), --help outputs, --help sweeps, --help resuming,",
        "--help speed, --help errors; kdrun --help readme prints all of it.",
        "",
        "Exit codes: 0 completed, 2 bad input (one line on stderr), 3 training diverged (metrics.json",
        "says where; the last good checkpoint is kept), 1 some jobs of a sweep did not complete.",
    ]
    return "\n".join(lines)


_HEADING = re.compile(r"^(#{2,3}) (.+)$")


def readme() -> Optional[str]:
    """The README: a source checkout's own, else the copy pip installed in the package's metadata."""
    checkout = Path(__file__).resolve().parents[2] / "README.md"
    if checkout.is_file() and checkout.read_text().startswith("# kdrun"):
        return checkout.read_text()
    try:
        metadata = importlib.metadata.metadata("kdrun")
    except importlib.metadata.PackageNotFoundError:
        return None
    text = metadata.get_payload() if hasattr(metadata, "get_payload") else None  # Metadata 2.1+: the body
    return text or metadata.get("Description")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, text) of every `##`/`###` section; a `##` section includes its `###` subsections."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        level = len(heading.group(1))
        end = next((j for j in range(i + 1, len(lines)) if (h := _HEADING.match(lines[j])) and len(h.group(1)) <= level),
                   len(lines))
        found.append((heading.group(2).strip(), "\n".join(lines[i:end]).rstrip()))
    return found


def _matches(topic: str, heading: str, loose: bool = False) -> bool:
    """`metrics` finds "metrics.json", `sweeps` "Sweeps"; loose: `resume` finds "Resuming", `config`
    "Configuration" (a shared stem of five letters or more)."""
    topic = topic.lower()
    words = re.findall(r"[a-z0-9][a-z0-9.-]*", heading.lower())
    if topic == heading.lower() or any(word.startswith(topic) for word in words):
        return True
    return loose and any(len(os.path.commonprefix([word, topic])) >= max(5, len(topic) - 2) for word in words)


def topic_text(topic: str) -> str:
    """The README sections `topic` names (`readme`: all of it). Raises KdrunError when none does."""
    from kdrun.errors import KdrunError

    text = readme()
    if text is None:
        raise KdrunError("this kdrun was installed without its README (package metadata): see kdrun --help")
    if topic.lower() in ("readme", "all"):
        return text.rstrip()
    chosen = ([body for heading, body in sections(text) if _matches(topic, heading)]
              or [body for heading, body in sections(text) if _matches(topic, heading, loose=True)])
    # A `##` section already holds its matching `###` subsections: print each text once.
    chosen = [body for body in chosen if not any(body != other and body in other for other in chosen)]
    if not chosen:
        headings = ", ".join(heading for heading, _ in sections(text))
        raise KdrunError(f"no README section matches '{topic}': try one of {headings}; or kdrun --help readme")
    return "\n\n".join(chosen)
