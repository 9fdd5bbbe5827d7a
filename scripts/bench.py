"""Benchmark kdrun's training engine, teacher-output cache and data path against plain PyTorch.

    python scripts/bench.py                        # CPU defaults: a few minutes on 2 cores
    python scripts/bench.py --device cuda --teacher resnet50 --student mobilenetv3_large_100 \\
        --image-size 224 --batch-size 128 --precision bf16 --channels-last

In ONE process, on the same models, data, batch size, threads and device, the variants below run
one epoch each, in an order rotated every round, for --rounds rounds after a warm-up epoch; the
table shows medians (images/s) and ratios of medians:

  hand       a minimal hand-written KD loop on in-memory float tensors: teacher forward under
             no_grad, student forward/backward, optimizer step (the physical work, nothing else)
  kdrun      kdrun's real training loop (engine.step.train_epoch after trainer.prepare_training)
  cached     kdrun with teacher.cache: teacher outputs read from the memory-mapped cache
  baseline   kdrun training the student alone (hard labels, no teacher)
  data       the data path alone: kdrun's InMemoryDataset + Batches with batched crop/flip, vs a
             torchvision-style Dataset (PIL image + RandomCrop/Flip/ToTensor/Normalize per sample)
             and a DataLoader

Peak memory: each variant again in a fresh subprocess, one epoch. On the CPU, tracemalloc is no use
(it sees Python's allocator, not torch's), so the figure is the OS's peak resident set (Linux VmHWM,
the counter behind getrusage's ru_maxrss, reset through /proc/self/clear_refs just before the epoch so
setup does not count; ru_maxrss itself would start from the parent's peak, see _peak_rss_mb):
"peak MB" is the whole process at its peak (torch's runtime, models, data included) and "+MB" that
peak minus the resident set before the epoch (activations, gradients, optimizer state, batches). One
process per variant, so one variant's peak never hides another's. On CUDA: torch.cuda's peak of
allocated tensor memory over a second epoch (after a warm-up one); the timed epochs also record it in
this process (`cuda_peak_mb`, and `cuda_delta_mb` over what was allocated before the epoch), so
--skip-memory still reports GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from kdrun.data.augment import RandomCropFlip  # noqa: E402
from kdrun.data.bundle import InMemoryDataset  # noqa: E402
from kdrun.data.synthetic import build_synthetic  # noqa: E402
from kdrun.distill import build_loss, hard_label_loss  # noqa: E402
from kdrun.engine import teacher_cache  # noqa: E402
from kdrun.engine.forward import StepForward  # noqa: E402
from kdrun.engine.loaders import Batches, on_device  # noqa: E402
from kdrun.engine.speed import Speed  # noqa: E402
from kdrun.engine.step import train_epoch  # noqa: E402
from kdrun.engine.trainer import Recipe, Stage, prepare_training  # noqa: E402
from kdrun.models import create_model  # noqa: E402

TRAIN_VARIANTS = ("hand", "kdrun", "cached", "baseline")
DATA_VARIANTS = ("data_kdrun", "data_torchvision")
SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
T, ALPHA, LR = 4.0, 0.9, 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="cifar:resnet14")
    parser.add_argument("--student", default="cifar:resnet8")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=512, help="images per timed training epoch")
    parser.add_argument("--data-size", type=int, default=4096, help="images per timed data-path epoch")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the torchvision data path")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated variants to time (default: all); no ratios")
    parser.add_argument("--out", default="outputs/bench.json")
    parser.add_argument("--child", choices=TRAIN_VARIANTS + DATA_VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- data ---------------------------------------------------------------------------------------

def synthetic(args, size: int, augment: bool) -> InMemoryDataset:
    bundle = build_synthetic({"num_classes": args.num_classes, "train_size": size, "test_size": 1,
                              "image_size": args.image_size, "in_chans": 3, "seed": 0})
    train = bundle.train
    return InMemoryDataset(train.images, train.labels, train.mean, train.std,
                           augment=RandomCropFlip(4) if augment else None)


class PilDataset(Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from a uint8 HWC array, then transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_loader(args, dataset: InMemoryDataset, images: np.ndarray, seed: int) -> DataLoader:
    transform = transforms.Compose([transforms.RandomCrop(args.image_size, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(dataset.mean, dataset.std)])
    return DataLoader(PilDataset(images, dataset.labels.numpy(), transform), batch_size=args.batch_size,
                      shuffle=True, num_workers=args.workers, generator=torch.Generator().manual_seed(seed),
                      pin_memory=args.device.startswith("cuda"))


# --- training variants: each returns run(epoch) -> seconds -----------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(args, device):
    torch.manual_seed(1)
    teacher = create_model(args.teacher, args.num_classes, 3, image_size=(args.image_size, args.image_size))
    teacher.to(device).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = create_model(args.student, args.num_classes, 3, image_size=(args.image_size, args.image_size))
    return student.to(device), teacher


def make_speed(args, device) -> Speed:
    return Speed(args.precision, args.channels_last, args.compile, device.type)


def hand_loop(args, device, data: InMemoryDataset):
    student, teacher = models(args, device)
    speed = make_speed(args, device)
    speed.prepare(student)
    speed.prepare(teacher)
    images, labels, _ = data.batch(torch.arange(len(data)))
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def run(epoch: int) -> float:
        sync(device)
        started = time.perf_counter()
        student.train()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch)).to(device)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            x, y = images[idx], labels[idx]
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with torch.no_grad():
                    t = teacher(x)
                s = student(x)
                loss = (1 - ALPHA) * F.cross_entropy(s, y) + ALPHA * T * T * F.kl_div(
                    F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        sync(device)
        return time.perf_counter() - started

    return run


def kdrun_loop(args, device, data: InMemoryDataset, variant: str, cache_root: Path):
    """The real loop, set up by the trainer's own prepare_training (minus evaluation and checkpoints)."""
    student, teacher = models(args, device)
    speed = make_speed(args, device)
    train_set = on_device(data, device)
    stage = Stage("bench", Recipe(10_000, LR, args.batch_size, SGD, {"name": "cosine"}, 0), device,
                  cache_root / "unused", {}, speed=speed)
    if variant == "baseline":
        loss, teacher = hard_label_loss(), None
    else:
        loss = build_loss({"terms": {"ce": {"type": "ce", "weight": 1 - ALPHA},
                                     "kd": {"type": "kd", "weight": ALPHA, "T": T}}})
    outputs = None
    if variant == "cached":
        spec = teacher_cache.cache_spec(args.teacher, teacher, {"bench": True}, data, None, speed)
        outputs = teacher_cache.load_or_build(cache_root, spec, teacher, None, data, args.batch_size, device,
                                              speed, 1e9)
    training = prepare_training(stage, StepForward(student, teacher, None, outputs), loss, train_set)

    def run(epoch: int) -> float:
        sync(device)
        started = time.perf_counter()
        train_epoch(training, epoch)
        sync(device)
        return time.perf_counter() - started

    return run


def data_path(args, device, variant: str):
    data = on_device(synthetic(args, args.data_size, augment=True), device)
    source = synthetic(args, args.data_size, augment=False)  # the same images, for the PIL pipeline
    pil_images = source.images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as torchvision's CIFAR stores them

    def run_kdrun(epoch: int) -> float:
        sync(device)
        started = time.perf_counter()
        for images, labels, _ in Batches(data, args.batch_size, device, shuffle=True, epoch=epoch):
            pass
        sync(device)
        return time.perf_counter() - started

    def run_torchvision(epoch: int) -> float:
        loader = torchvision_loader(args, source, pil_images, epoch)
        sync(device)
        started = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        sync(device)
        return time.perf_counter() - started

    return run_kdrun if variant == "data_kdrun" else run_torchvision


def build_variant(args, device, variant: str, cache_root: Path):
    if variant in DATA_VARIANTS:
        return data_path(args, device, variant), args.data_size
    data = synthetic(args, args.train_size, augment=False)  # deterministic: the cache is valid
    if variant == "hand":
        return hand_loop(args, device, data), args.train_size
    return kdrun_loop(args, device, data, variant, cache_root), args.train_size


# --- measurement ----------------------------------------------------------------------------------

def time_variants(args, device, cache_root: Path) -> dict:
    runs = {}
    for variant in args.only.split(",") if args.only else TRAIN_VARIANTS + DATA_VARIANTS:
        run, images = build_variant(args, device, variant, cache_root)
        run(0)  # warm-up: allocator, oneDNN/cuDNN algorithm choice, compilation
        runs[variant] = (run, images)
    seconds = {variant: [] for variant in runs}
    cuda_mb = {variant: (0.0, 0.0) for variant in runs}  # (peak allocated, peak minus allocated before)
    order = list(runs)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for variant in order[shift:] + order[:shift]:  # rotate, so no variant always runs first
            run, images = runs[variant]
            if device.type == "cuda":  # in this process, per epoch: no subprocess per variant needed
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            seconds[variant].append(run(round_index + 1))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                cuda_mb[variant] = (max(cuda_mb[variant][0], peak / 2**20),
                                    max(cuda_mb[variant][1], (peak - before) / 2**20))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{v} {runs[v][1] / seconds[v][-1]:.0f}" for v in order) + " images/s", file=sys.stderr)
    return {variant: {"images_per_s": runs[variant][1] / statistics.median(values),
                      "median_s": statistics.median(values), "seconds": [round(s, 4) for s in values],
                      "images": runs[variant][1],
                      **({"cuda_peak_mb": round(cuda_mb[variant][0], 1), "cuda_delta_mb": round(cuda_mb[variant][1], 1)}
                         if device.type == "cuda" else {})}
            for variant, values in seconds.items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """The peak resident set of this process's memory (Linux VmHWM). Not ru_maxrss: across fork + exec
    Linux carries the PARENT's peak into it, so every child of a big benchmark process reads the same."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _reset_peak_rss() -> bool:
    """Linux >= 4.0 resets the peak resident set (and so ru_maxrss) on request; elsewhere the peak
    covers the whole process, imports and setup included, and the delta may read low."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child_memory(args) -> dict:
    """One variant in this fresh process: setup and warm-up outside the measured epoch."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache_root:
        run, _ = build_variant(args, device, args.child, Path(cache_root))
        if device.type == "cuda":
            run(0)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run(1)
            return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                    "delta_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20, "method": "cuda"}
        reset = _reset_peak_rss()
        before = _rss_mb()
        run(1)
        peak = _peak_rss_mb()
        method = ("VmHWM since reset" if reset else "VmHWM (process lifetime)") if peak else "ru_maxrss"
        if not peak:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"peak_mb": peak, "delta_mb": max(0.0, peak - before), "method": method}


def child_argv(args) -> list[str]:
    argv = []
    for key, value in vars(args).items():
        if key in ("child", "out", "skip_memory", "only") or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def measure_memory(args) -> dict:
    result = {}
    for variant in TRAIN_VARIANTS + DATA_VARIANTS:
        proc = subprocess.run([sys.executable, __file__, *child_argv(args), "--child", variant],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory measurement of {variant} failed:\n{proc.stderr[-2000:]}")
        result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def machine(device: torch.device, threads: int) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    return {"device": str(device), "device_name": name, "cpu": cpu_model, "cpu_count": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def table(report: dict) -> str:
    timing, memory = report["timing"], report.get("memory", {})
    lines = [f"{'variant':18}{'images/s':>10}{'median s':>10}{'peak MB':>10}{'+MB':>8}"]
    for variant, row in timing.items():
        mem = memory.get(variant, {})
        lines.append(f"{variant:18}{row['images_per_s']:10.0f}{row['median_s']:10.3f}"
                     f"{mem.get('peak_mb', float('nan')):10.0f}{mem.get('delta_mb', float('nan')):8.0f}")
    ratios = report["ratios"]
    lines += [
        f"kdrun / hand loop (images/s):            {ratios['kdrun_vs_hand']:.3f}x  (target >= 0.95x; "
        f"fastest epochs {ratios['kdrun_vs_hand_best']:.3f}x)",
        f"cached distill epoch / baseline epoch:   {ratios['cached_epoch_vs_baseline']:.3f}x  (target <= 1.15x; "
        f"fastest epochs {ratios['cached_epoch_vs_baseline_best']:.3f}x)",
        f"uncached distill epoch / baseline epoch: {ratios['distill_epoch_vs_baseline']:.3f}x",
        f"cache speed-up of a distill epoch:       {ratios['cache_speedup']:.3f}x",
        f"kdrun data path / torchvision DataLoader: {ratios['data_kdrun_vs_torchvision']:.1f}x  (target >= 3x)",
    ]
    m = report["machine"]
    lines.append(f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['threads']} threads), device {m['device_name']}, "
                 f"torch {m['torch']}, load average {m['load_average']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(args)))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_root:
        timing = time_variants(args, device, Path(cache_root))
    ips = {variant: row["images_per_s"] for variant, row in timing.items()}
    if args.only:
        print("\n".join(f"{v:18}{r['images_per_s']:10.1f} images/s  {r['seconds']}" for v, r in timing.items()))
        return
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "machine": machine(device, args.threads),
        "timing": timing,
        "ratios": {
            "kdrun_vs_hand": ips["kdrun"] / ips["hand"],
            "cached_epoch_vs_baseline": ips["baseline"] / ips["cached"],
            "distill_epoch_vs_baseline": ips["baseline"] / ips["kdrun"],
            "cache_speedup": ips["cached"] / ips["kdrun"],
            "data_kdrun_vs_torchvision": ips["data_kdrun"] / ips["data_torchvision"],
            # On a shared machine the fastest epoch is the one least disturbed by others' work.
            "kdrun_vs_hand_best": min(timing["hand"]["seconds"]) / min(timing["kdrun"]["seconds"]),
            "cached_epoch_vs_baseline_best": min(timing["cached"]["seconds"]) / min(timing["baseline"]["seconds"]),
        },
    }
    if not args.skip_memory:
        report["memory"] = measure_memory(args)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
