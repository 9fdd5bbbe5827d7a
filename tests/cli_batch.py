"""Run many `kdrun` invocations from one process: import once, then fork a child per invocation.

    python cli_batch.py {light,heavy} CASES.json RESULTS.json

CASES.json holds [{"args": [...], "cwd": DIR}, ...]. Each child calls kdrun.cli.main.main() with those
arguments in that directory, stdout and stderr going to files, and ends with main()'s exit status
(an uncaught exception prints its traceback and exits 1, as the interpreter would): what
`python -m kdrun.cli ARGS` does, without paying the imports of torch and timm (seconds) per case.
`light` imports only kdrun.cli.main, so each result also tells whether the case loaded torch at all;
`heavy` imports torch, timm and the runner first. RESULTS.json: [{"rc", "seconds", "stdout", "stderr", "torch"}].
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

CASE_TIMEOUT_S = 240


def main() -> None:
    mode, cases_file, results_file = sys.argv[1:4]
    import kdrun.cli.main  # noqa: F401  (registers the configs)
    if mode == "heavy":
        import kdrun.models.features  # noqa: F401
        import kdrun.run.pipeline  # noqa: F401
        import torch.utils.tensorboard  # noqa: F401
    cases = json.loads(Path(cases_file).read_text())
    out_dir = Path(results_file).parent / f".{mode}_outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run_case(case, out_dir / str(i)) for i, case in enumerate(cases)]
    Path(results_file).write_text(json.dumps(results))


def run_case(case: dict, prefix: Path) -> dict:
    stdout, stderr, torch_flag = (Path(f"{prefix}.{name}") for name in ("stdout", "stderr", "torch"))
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(case, stdout, stderr, torch_flag)
    _, status = os.waitpid(pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - started, 2),
            "stdout": stdout.read_text(errors="replace"),
            "stderr": stderr.read_text(errors="replace"),
            "torch": torch_flag.read_text() == "1" if torch_flag.exists() else None}


def _child(case: dict, stdout: Path, stderr: Path, torch_flag: Path) -> None:
    code = 1
    try:
        signal.alarm(CASE_TIMEOUT_S)
        os.chdir(case["cwd"])
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        import kdrun.cli.main

        sys.argv = [kdrun.cli.main.__file__, *case["args"]]
        try:
            kdrun.cli.main.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001  (what the interpreter would print)
            traceback.print_exc()
            code = 1
        torch_flag.write_text("1" if "torch" in sys.modules else "0")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
