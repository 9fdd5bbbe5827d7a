"""Checks of the stored-teacher options (teacher.outputs, teacher.export_outputs, export_kind, export_k) that
need no file read and no torch; the file itself is checked once the dataset is built (engine/teacher_file.py)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from kdrun.config.paradigm_checks import paradigm_name
from kdrun.errors import KdrunError

EXPORT_KINDS = ("logits", "topk", "label")
# The paradigms that can take a stored teacher instead of a model: offline distils from it; baseline never reads it.
READS_STORED_TEACHER = ("offline", "baseline")


def check_stored_teacher(cfg: DictConfig) -> None:
    teacher, paradigm = cfg.teacher, paradigm_name(cfg)
    for role in ("student", "assistant"):
        model = cfg.get(role)
        if model is not None and (model.get("outputs") or model.get("export_outputs")):
            raise KdrunError(f"{role}.outputs / {role}.export_outputs: only a teacher's outputs are stored; "
                             "pass teacher.outputs=PATH or teacher.export_outputs=true")
    kind = str(teacher.export_kind)
    if kind not in EXPORT_KINDS:
        raise KdrunError(f"teacher.export_kind={kind} must be one of {', '.join(EXPORT_KINDS)}, e.g. "
                         "teacher.export_kind=topk")
    if teacher.export_k < 1:
        raise KdrunError(f"teacher.export_k={teacher.export_k} must be >= 1, e.g. teacher.export_k=5")
    if teacher.export_outputs and paradigm != "teacher":
        raise KdrunError(f"teacher.export_outputs=true writes the outputs of paradigm=teacher's model (here "
                         f"paradigm={paradigm}): pass paradigm=teacher")
    if not teacher.outputs:
        return
    path = Path(str(teacher.outputs)).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise KdrunError(f"teacher.outputs={path}: {what}; pass a teacher-outputs file written by "
                         "`kdrun paradigm=teacher teacher.export_outputs=true` (RUN_DIR/teacher_outputs.npz)")
    if paradigm not in READS_STORED_TEACHER:
        raise KdrunError(f"teacher.outputs=PATH replaces the teacher of paradigm=offline; paradigm={paradigm} "
                         "needs teacher models: pass paradigm=offline, or drop teacher.outputs")
    for option, value, fix in (("teacher.checkpoint", teacher.checkpoint, "drop teacher.checkpoint"),
                               ("teacher.cache", teacher.cache, "pass teacher.cache=false"),
                               ("teacher.export_outputs", teacher.export_outputs, "drop teacher.export_outputs")):
        if value:
            raise KdrunError(f"teacher.outputs=PATH replaces the teacher model, so {option} has nothing to act on: "
                             f"{fix}")
