"""Which process of a `torchrun` launch this is, read from the environment torchrun sets.

Light on purpose (no torch import): the CLI asks before Hydra composes the config. Every process
of a launch runs the same command; only rank 0 writes the run directory, so the others get a
private temporary Hydra directory (removed at exit) and no log files.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from kdrun.errors import KdrunError

# Overrides the other ranks must not take from the command line: kdrun sets its own.
_RANK_ZERO_ONLY = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=", "hydra/hydra_logging=")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in a plain run and in rank 0 of a torchrun launch: the one process that writes files."""
    return rank() == 0


def worker_argv(args: list[str]) -> list[str]:
    """The command line of this process: unchanged for rank 0, redirected away from outputs/ for the others."""
    if world_size() > 1 and any(arg in ("-m", "--multirun") or arg.startswith("hydra/launcher=") for arg in args):
        raise KdrunError("torchrun runs one experiment at a time: drop -m/--multirun, or sweep without torchrun "
                         "(Hydra's launchers run the jobs)")
    if rank() == 0:
        return args
    scratch = tempfile.mkdtemp(prefix=f"kdrun-rank{rank()}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [arg for arg in args if not arg.lstrip("+~").startswith(_RANK_ZERO_ONLY)]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
