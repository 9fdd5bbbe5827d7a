"""Training paradigms: how the models of a run are trained, chosen with `paradigm=NAME` (conf/paradigm/).

`offline` (the default) is kdrun.run.pipeline's own path; every other paradigm is a small module here that
reuses the stages (kdrun.stages.roles), the one training loop (kdrun.engine.trainer), the stage cache and the
metrics, and writes the same kinds of outputs: metrics.json, checkpoints/, TensorBoard events.
Imports stay light here (the CLI validates settings before torch loads); each runner loads its own module.
"""
from __future__ import annotations

import importlib

from kdrun.config.paradigm_checks import PARADIGMS, paradigm_name, unread_settings

# paradigm name -> "module:function" under kdrun.paradigms; the function is run(ctx, started) -> metrics
RUNNERS = {
    "teacher": "single_stage:run_teacher",
    "baseline": "single_stage:run_baseline",
    "online": "online:run",
    "self": "born_again:run",
    "multi_teacher": "multi_teacher:run",
    "assistant": "assistant:run",
}


def run_paradigm(ctx, started: float) -> dict:
    """Run the paradigm `ctx.cfg.paradigm.name` (anything but offline) and return its metrics."""
    module, function = RUNNERS[paradigm_name(ctx.cfg)].split(":")
    return getattr(importlib.import_module(f"kdrun.paradigms.{module}"), function)(ctx, started)


__all__ = ["RUNNERS", "PARADIGMS", "paradigm_name", "run_paradigm", "unread_settings"]
