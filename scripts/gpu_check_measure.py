"""The measurements of scripts/gpu_check.py, each run in a child process of its own:

    python scripts/gpu_check_measure.py NAME SPEC_JSON RESULT_FILE

NAME is environment, parity, bench or ddp_probe. Each appends one JSON object per line to RESULT_FILE as
soon as it has it (flushed), so a child killed by the time budget, or one that crashes the CUDA context,
still leaves the measurements it finished. The parent (gpu_check.py) never imports torch: a failing
measurement cannot take the others down with it.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tolerances of the autocast loss parity (relative error of the loss; cosine of the student's gradient
# with the fp32 one). bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per logit), fp16 11 bits
# (2^-12 = 0.02%); the losses themselves run in fp32 under autocast (log_softmax and kl_div are on its
# fp32 list), so what differs is the logits' rounding, seen through T = 4 and a KL. Measured on a CPU
# (same rounding as a GPU's): bf16 0.2% (KD) and 0.06% (DKD) on the loss, gradient cosine 0.99991;
# fp16 0.005% / 0.012%, cosine 0.999997. The tolerances leave a margin of 5-10x over those.
PARITY_TOLERANCE = {"bf16": {"loss_rel": 1e-2, "grad_cos": 0.999},
                    "fp16": {"loss_rel": 1e-3, "grad_cos": 0.99995}}


def emitter(result_file: str):
    def emit(record: dict) -> None:
        with open(result_file, "a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
    return emit


def one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"{type(err).__name__}: {text[:300]}"


# --- environment --------------------------------------------------------------------------------------

VERSIONED = {"torchvision": "torchvision", "timm": "timm", "tensorboard": "tensorboard", "hydra": "hydra-core",
             "omegaconf": "omegaconf", "torchmetrics": "torchmetrics"}


def environment(spec: dict, emit) -> None:
    import importlib.metadata

    import torch

    record = {"python": platform.python_version(), "torch": torch.__version__,
              "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
              "cpu_count": os.cpu_count(), "platform": platform.platform()}
    # Versions from the packages' metadata, without importing them (timm alone takes seconds); the
    # sections that need a package fail on their own when it does not import.
    for key, dist in VERSIONED.items():
        found = importlib.util.find_spec(key)
        try:
            record[key] = importlib.metadata.version(dist) if found else "missing"
        except importlib.metadata.PackageNotFoundError:
            record[key] = "installed, no metadata" if found else "missing"
    kdrun_spec = importlib.util.find_spec("kdrun")
    record["kdrun_path"] = str(Path(kdrun_spec.origin).parent) if kdrun_spec else "missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                      gpu_memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                      bf16_supported=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
        record["driver"] = _driver_version()
    else:
        record.update(gpu=None, gpu_count=0, driver=None)
    emit(record)


def _driver_version():
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[0]
    return None


# --- autocast loss parity -----------------------------------------------------------------------------

PARITY_METHODS = {
    "kd": {"terms": {"kd": {"type": "kd", "T": 4.0}}},
    "dkd": {"terms": {"dkd": {"type": "dkd", "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup_epochs": 1}}},
}


def parity(spec: dict, emit) -> None:
    """kdrun's KD and DKD terms on the logits of linear heads (where a network's logits get their precision)
    under autocast against fp32: the loss and the gradient of the student's head."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from kdrun.distill import build_loss
    from kdrun.distill.context import StepContext

    device = torch.device(spec["device"])
    batch, width, classes = spec.get("batch", 256), spec.get("width", 512), spec.get("classes", 100)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, width, generator=generator).to(device)
    targets = torch.randint(0, classes, (batch,), generator=generator).to(device)
    student, teacher = nn.Linear(width, classes).to(device), nn.Linear(width, classes).to(device)
    with torch.no_grad():  # logits of a trained-looking spread (std ~3 for the teacher, ~2 for the student)
        teacher.weight.copy_(torch.randn(classes, width, generator=generator) * 3 / width ** 0.5)
        student.weight.copy_(torch.randn(classes, width, generator=generator) * 2 / width ** 0.5)

    def loss_and_grad(method: dict, dtype):
        loss = build_loss(method).to(device)
        student.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                teacher_logits = teacher(features)
            student_logits = student(features)
            total, _ = loss(StepContext(student_logits, targets, torch.arange(batch, device=device),
                                        teacher_logits=teacher_logits, epoch=1))
        total.backward()
        return float(total.detach().float()), student.weight.grad.detach().float().flatten().clone()

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for precision in spec["precisions"]:
        for method_name, method in PARITY_METHODS.items():
            try:
                reference, ref_grad = loss_and_grad(method, None)
                value, grad = loss_and_grad(method, dtypes[precision])
                tolerance = PARITY_TOLERANCE[precision]
                loss_rel = abs(value - reference) / abs(reference)
                grad_cos = float(F.cosine_similarity(grad, ref_grad, dim=0))
                emit({"precision": precision, "method": method_name, "loss_fp32": reference, "loss_amp": value,
                      "loss_rel": loss_rel, "grad_cos": grad_cos, "tolerance": tolerance,
                      "passed": loss_rel <= tolerance["loss_rel"] and grad_cos >= tolerance["grad_cos"]})
            except Exception as err:  # e.g. a dtype this device's autocast lacks
                emit({"precision": precision, "method": method_name, "error": one_line(err)})


# --- scripts/bench.py, one speed setting after another in this process ---------------------------------

def _bench_module():
    spec = importlib.util.spec_from_file_location("kdrun_bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(spec: dict, emit) -> None:
    """spec: the size config (teacher, student, image_size, batch_size, train_size, data_size, num_classes,
    rounds, workers, device, threads) and `speeds`: [{name, precision, channels_last, compile, data}]."""
    import torch

    bench_script = _bench_module()
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what kdrun's build_speed turns on for a run
    for speed in spec["speeds"]:
        variants = list(bench_script.TRAIN_VARIANTS) + (list(bench_script.DATA_VARIANTS) if speed.get("data") else [])
        argv = ["--teacher", spec["teacher"], "--student", spec["student"], "--image-size", str(spec["image_size"]),
                "--batch-size", str(spec["batch_size"]), "--train-size", str(spec["train_size"]),
                "--data-size", str(spec["data_size"]), "--num-classes", str(spec["num_classes"]),
                "--device", spec["device"], "--rounds", str(spec["rounds"]), "--workers", str(spec["workers"]),
                "--precision", speed["precision"], "--only", ",".join(variants), "--skip-memory"]
        argv += ["--channels-last"] if speed.get("channels_last") else []
        argv += ["--compile"] if speed.get("compile") else []
        started = time.perf_counter()
        try:
            args = bench_script.parse_args(argv)
            if spec.get("threads"):
                args.threads = spec["threads"]
            with tempfile.TemporaryDirectory() as cache_root:
                timing = bench_script.time_variants(args, device, Path(cache_root))
            emit({"speed": speed["name"], "timing": timing, "ratios": bench_ratios(timing),
                  "seconds": round(time.perf_counter() - started, 1)})
        except Exception as err:
            emit({"speed": speed["name"], "error": one_line(err), "seconds": round(time.perf_counter() - started, 1)})
            if "CUDA error" in str(err) or "cudaError" in str(err):
                return  # the CUDA context is gone: the next speeds would only fail the same way
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_ratios(timing: dict) -> dict:
    """What scripts/bench.py's report computes, for the variants that ran."""
    ips = {variant: row["images_per_s"] for variant, row in timing.items()}
    ratios = {"kdrun_vs_hand": ips["kdrun"] / ips["hand"],
              "kdrun_vs_hand_best": min(timing["hand"]["seconds"]) / min(timing["kdrun"]["seconds"]),
              "cached_epoch_vs_baseline": ips["baseline"] / ips["cached"],
              "cached_epoch_vs_baseline_best": min(timing["cached"]["seconds"]) / min(timing["baseline"]["seconds"]),
              "distill_epoch_vs_baseline": ips["baseline"] / ips["kdrun"],
              "cache_speedup": ips["cached"] / ips["kdrun"]}
    if "data_kdrun" in ips:
        ratios["data_kdrun_vs_torchvision"] = ips["data_kdrun"] / ips["data_torchvision"]
    return ratios


# --- DDP under torchrun, without kdrun's CLI (it trains one process without DDP) -----------------------

def ddp_probe(spec: dict, emit) -> None:
    """Started by torchrun: join the process group (NCCL on CUDA), all-reduce, and one DDP training step."""
    import torch
    import torch.distributed as dist
    from torch import nn

    cuda = spec["device"] == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        value = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(value)
        model = nn.parallel.DistributedDataParallel(nn.Linear(8, 2).to(device), device_ids=[device.index] if cuda else None)
        loss = model(torch.randn(16, 8, device=device)).square().mean()
        loss.backward()
        grad_sum = float(model.module.weight.grad.abs().sum())
        dist.barrier()
        if rank == 0:
            emit({"backend": dist.get_backend(), "world_size": world, "all_reduce": value[0].item(),
                  "all_reduce_expected": world * (world + 1) / 2, "ddp_grad_finite": grad_sum == grad_sum})
    finally:
        dist.destroy_process_group()


MEASUREMENTS = {"environment": environment, "parity": parity, "bench": bench, "ddp_probe": ddp_probe}


if __name__ == "__main__":
    name, spec_json, result_file = sys.argv[1:4]
    MEASUREMENTS[name](json.loads(spec_json), emitter(result_file))
