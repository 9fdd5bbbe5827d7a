"""The paradigm registry: `@PARADIGMS.register("name")` above a paradigm's `run(ctx) -> ParadigmResult`."""
from kdrun.registry import Registry

PARADIGMS = Registry("paradigm", "paradigm=NAME")
