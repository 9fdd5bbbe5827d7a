"""Training paradigms: which models a run trains and how, chosen with `paradigm=NAME` (conf/paradigm/).

Each paradigm is one module here that registers a function `run(ctx) -> ParadigmResult` with
`@PARADIGMS.register("name")`: it obtains or trains its models through kdrun.stages.roles, evaluates
each (kdrun.paradigms.result.model_metrics) and returns them; the run pipeline (kdrun.run) writes
metrics.json, TensorBoard and the table. A new paradigm is one file here plus one YAML in conf/paradigm/:
every module of this package is imported below, so its registration runs without a list to extend.
"""
import importlib
import pkgutil

from kdrun.paradigms.registry import PARADIGMS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PARADIGMS"]
