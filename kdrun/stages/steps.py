"""The preflight's view of a stage: how to build its model and loss for one training step (kdrun.run.preflight).

Each paradigm registers the steps of its stages with itself (`@PARADIGMS.register(name, preflight=...)`),
built from these pieces, so a new paradigm declares what it trains in its own file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import nn

from kdrun.distill import DistillLoss, hard_label_loss
from kdrun.engine.forward import StepForward
from kdrun.engine.trainer import Recipe
from kdrun.stages.context import RunContext
from kdrun.stages.roles import distill_forward, hard_label_role


@dataclass
class Step:
    """One stage's training step, built when the preflight reaches it."""
    label: str                      # names the model in messages: "student cifar:vgg8 (baseline)"
    role: str                       # the config key that chose the model, for hints: student, teacher, paradigm.peers
    build: Callable[[], tuple[StepForward, DistillLoss]]
    recipe: Optional[Recipe]        # None: the model only runs frozen (a teacher loaded from its checkpoint)
    method: bool = False            # trains with the run's distill method (its terms' options may be at fault)
    built: Optional[tuple[StepForward, DistillLoss]] = field(default=None, repr=False)

    def parts(self) -> tuple[StepForward, DistillLoss]:
        if self.built is None:
            self.built = self.build()
        return self.built

    def model(self) -> nn.Module:
        """The model this step trained, as a later step's teacher (built once: a teacher is often the largest)."""
        return self.parts()[0].student


def teacher_step(ctx: RunContext) -> Step:
    """Trained on hard labels, or (from a checkpoint) run frozen."""
    label = f"teacher {ctx.cfg.teacher.name}"
    if ctx.cfg.teacher.checkpoint:
        # build_model loads the checkpoint's weights: the teacher only runs frozen
        return Step(label, "teacher", lambda: (StepForward(ctx.build_model("teacher")), hard_label_loss()), None)
    return hard_label_step(ctx, "teacher", "teacher", label)


def hard_label_step(ctx: RunContext, stage: str, role: str, label: str) -> Step:
    def build():
        built = hard_label_role(ctx, stage, role)
        return built.forward, built.loss
    return Step(label, role, build, ctx.recipe(role))


def baseline_step(ctx: RunContext) -> Step:
    return hard_label_step(ctx, "baseline", "student", f"student {ctx.cfg.student.name} (baseline)")


def distill_step(ctx: RunContext, label: str, teacher: Optional[Callable[[], nn.Module]],
                 role: str = "student") -> Step:
    """ctx's student learning from `teacher()` with the run's method (feature taps, adapters, strong views);
    `teacher=None`: from the stored outputs of teacher.outputs."""
    def build():
        model = ctx.build_model("student").to(ctx.device)
        frozen = teacher().to(ctx.device).eval().requires_grad_(False) if teacher is not None else None
        return distill_forward(ctx, model, frozen, cached_teacher=False)  # never writes the teacher cache
    return Step(label, role, build, ctx.recipe("student"), method=True)


def student_only(ctx: RunContext) -> Iterator[Step]:
    """A paradigm that registers no steps of its own: at least its student."""
    yield baseline_step(ctx)
