"""The imagefolder data path at 224x224: the PIL DataLoader against dataset.pack=true, in one process.

    python scripts/bench_imagefolder.py                   # ~3 minutes on 2 CPU cores
    python scripts/bench_imagefolder.py --device cuda     # on a GPU: the packed crops run there

A folder of JPEGs of ImageNet's typical sizes (500x375, 375x500, 500x333, 640x480; smooth content plus
noise, quality 90) is written once; then, for --rounds rounds after a warm-up epoch, in an order rotated
every round, one training epoch (random resized crop 224 + flip, normalized, batches on --device) of:

  pil          kdrun's imagefolder path: ImageFolder + PIL transforms per image + DataLoader (--workers)
  packed       dataset.pack=true: rows gathered from the memory-mapped pack, cropped a batch at a time
  decode_jpeg  torchvision.io.decode_jpeg over each batch's files (on --device: nvJPEG on a GPU), then the
               same batched crops: what decoding the JPEGs every epoch costs without PIL

The one-time packing is timed too (its DataLoader uses --workers), with the epochs it takes to pay back.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from kdrun.data import build_dataset  # noqa: E402
from kdrun.data.resized_crop import RandomResizedCropFlip  # noqa: E402
from kdrun.engine.loaders import Batches, on_device  # noqa: E402

SIZES = [(500, 375), (375, 500), (500, 333), (640, 480)]
VARIANTS = ("pil", "packed", "decode_jpeg")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images (two classes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL path and of packing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench_imagefolder.json")
    return parser.parse_args(argv)


def write_folder(root: Path, count: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", count), ("val", 2)):
        for i in range(n):
            width, height = SIZES[i % len(SIZES)]
            coarse = torch.rand(1, 3, 6, 8, generator=generator) * 255
            pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
            pixels = pixels + 12 * torch.randn(pixels.shape, generator=generator)
            array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"{i}.jpg", quality=90)


def decode_jpeg_epoch(files: list[str], labels: torch.Tensor, args, device: torch.device, epoch: int):
    """Each batch: read the files, decode them (torchvision.io), resize to the evaluation side, then crop."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF

    side = int(args.image_size * 256 / 224)
    crop = RandomResizedCropFlip(args.image_size)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(epoch))
    for idx in order.split(args.batch_size):
        data = [read_file(files[i]) for i in idx.tolist()]
        decoded = decode_jpeg(data, device=device)
        squares = torch.stack([TF.center_crop(TF.resize(image, side, antialias=True), side) for image in decoded])
        images = crop(squares)
        yield images.float(), labels[idx].to(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "folder"
        write_folder(root, args.images)
        cfg = {"name": "imagefolder", "root": str(root), "image_size": args.image_size, "num_workers": args.workers,
               "pack_dir": str(Path(scratch) / "packs")}
        started = time.perf_counter()
        packed = build_dataset({**cfg, "pack": True})
        pack_seconds = time.perf_counter() - started
        pil = build_dataset(cfg)
        files = [path for path, _ in pil.train.base.samples]
        labels = torch.tensor([label for _, label in pil.train.base.samples])
        train = {"pil": pil.train, "packed": on_device(packed.train, device)}

        def run(variant: str, epoch: int) -> float:
            begun = time.perf_counter()
            if variant == "decode_jpeg":
                batches = decode_jpeg_epoch(files, labels, args, device, epoch)
            else:
                workers = args.workers if variant == "pil" else 0
                batches = Batches(train[variant], args.batch_size, device, shuffle=True, epoch=epoch, num_workers=workers)
            for images, *_ in batches:
                assert images.shape[-1] == args.image_size
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - begun

        seconds = {variant: [] for variant in VARIANTS}
        for variant in VARIANTS:
            run(variant, 0)  # warm-up
        for round_index in range(args.rounds):
            shift = round_index % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                seconds[variant].append(run(variant, round_index + 1))
            print(f"round {round_index + 1}: " + ", ".join(f"{v} {args.images / seconds[v][-1]:.0f}" for v in VARIANTS)
                  + " images/s", file=sys.stderr)
        pack_bytes = packed.train.images.numel()
    ips = {v: args.images / statistics.median(s) for v, s in seconds.items()}
    epoch_saved = args.images / ips["pil"] - args.images / ips["packed"]
    report = {"config": vars(args), "torch": torch.__version__, "load_average": [round(x, 1) for x in os.getloadavg()],
              "images_per_s": ips, "seconds": seconds,
              "ratios": {"packed_vs_pil": ips["packed"] / ips["pil"], "decode_jpeg_vs_pil": ips["decode_jpeg"] / ips["pil"],
                         # On a shared machine the fastest epoch is the one least disturbed by others' work.
                         "packed_vs_pil_best": min(seconds["pil"]) / min(seconds["packed"]),
                         "decode_jpeg_vs_pil_best": min(seconds["pil"]) / min(seconds["decode_jpeg"])},
              "pack": {"seconds": pack_seconds, "images_per_s": args.images / pack_seconds, "mb": pack_bytes / 2**20,
                       "epochs_to_pay_back": pack_seconds / epoch_saved if epoch_saved > 0 else None}}
    print(f"{'variant':12}{'images/s':>10}")
    for variant in VARIANTS:
        print(f"{variant:12}{ips[variant]:10.0f}")
    ratios = report["ratios"]
    print(f"packed / PIL DataLoader:      {ratios['packed_vs_pil']:.2f}x (fastest epochs {ratios['packed_vs_pil_best']:.2f}x)")
    print(f"decode_jpeg / PIL DataLoader: {ratios['decode_jpeg_vs_pil']:.2f}x (fastest epochs {ratios['decode_jpeg_vs_pil_best']:.2f}x)")
    print(f"load average {report['load_average']}")
    print(f"packing once: {pack_seconds:.1f} s ({report['pack']['images_per_s']:.0f} images/s, {report['pack']['mb']:.0f} MB), "
          f"paid back after {report['pack']['epochs_to_pay_back'] or float('nan'):.1f} epochs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
