"""quantize=qat: quantization-aware distillation. After the fp32 distill stage, the distilled student (or,
for feature methods, its feature taps) is fake-quantized (kdrun.deploy.qat) and distilled further from the
same fp32 teacher with the same method and loss state (adapters, learnt temperatures) for
`quantize.epochs` epochs at the student's lr times `quantize.lr_scale`.

It is a stage like the others: RUN_DIR/qat/checkpoints/{last,best}.pt (the fake-quant observers are in
the model's state_dict), its TensorBoard curves in RUN_DIR/qat/, and a killed run resumes it exactly.
Starting from the fp32 student leaves that student as a quantize=int8 run trains it, so PTQ and QAT of
the same student compare directly.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from kdrun.deploy.qat import FakeQuantized, prepare_qat
from kdrun.engine.forward import FeaturePairing, StepForward
from kdrun.engine.seeding import seed_everything
from kdrun.engine.trainer import Recipe
from kdrun.stages.context import RunContext, derive
from kdrun.stages.roles import Role, StageOutcome, distill_forward, train_role

log = logging.getLogger("kdrun")

QAT_DIR = "qat"   # RUN_DIR/qat/: the stage's checkpoints and curves


def check_qat_run(ctx: RunContext) -> None:
    """Before any stage trains: a student that torch.export captures and the quantizer takes."""
    prepare_qat(ctx.build_model("student"), example_images(ctx), ctx.cfg.student.name)


def qat_recipe(ctx: RunContext) -> Recipe:
    recipe, quantize = ctx.recipe("student"), ctx.cfg.quantize
    return dataclasses.replace(recipe, epochs=int(quantize.epochs), lr=recipe.lr * float(quantize.lr_scale))


def quantization_aware(ctx: RunContext, teacher: nn.Module | None, student: StageOutcome) -> StageOutcome:
    """`student` (the distill stage's outcome) fake-quantized and distilled from `teacher` (None: the stored
    outputs of teacher.outputs); the outcome's model is FakeQuantized, still fake-quantized."""
    seed_everything(ctx.cfg.seed)  # the same start whether the run went straight through or resumed
    name = ctx.cfg.student.name
    forward, loss = distill_forward(ctx, student.model, teacher)
    if student.loss is not None:  # the method's learnt parts (adapters, temperatures) go on from where they were
        loss.load_state_dict(student.loss.state_dict())
    pairing = forward.features
    graph = prepare_qat(pairing.student if pairing is not None else forward.student, example_images(ctx), name)
    graph.to(ctx.device)
    if pairing is not None:  # the taps' graph returns (logits, maps, embedding) for the feature terms
        taps = FakeQuantized(graph, logits_only=False)
        pairing = FeaturePairing(taps, pairing.teacher, pairing.student_index, pairing.teacher_index)
    model = FakeQuantized(graph)
    qat_forward = StepForward(model, forward.teacher, pairing, forward.teacher_outputs, forward.strong_view)
    recipe = qat_recipe(ctx)
    log.info("qat: %s fake-quantized (torchao PT2E, X86InductorQuantizer), distilled %d more epoch%s at lr %g",
             name, recipe.epochs, "s" * (recipe.epochs != 1), recipe.lr)
    meta = {**ctx.meta("student"), "quantization": "qat"}
    return train_role(derive(ctx, run_dir=ctx.run_dir / QAT_DIR), Role("qat", qat_forward, loss, meta, recipe))


def example_images(ctx: RunContext) -> torch.Tensor:
    """Two test images on the CPU: what torch.export traces with (the batch dimension stays dynamic)."""
    return torch.stack([ctx.data.test[i][0] for i in range(min(2, len(ctx.data.test)))]).float().cpu()
