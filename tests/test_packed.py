"""dataset.pack=true for imagefolder: the packed path gives the PIL path's images and labels, its crops are
torchvision's RandomResizedCrop within a stated tolerance, the pack is rebuilt when the files change, and
bad inputs are one line."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from kdrun.data import build_dataset
from kdrun.data import packed as packed_module
from kdrun.data.packed import PackedDataset, pack_side
from kdrun.data.resized_crop import (RATIO, SCALE, RandomResizedCropFlip, resize_boxes_per_image,
                                     resize_boxes_roi_align, sample_boxes)
from kdrun.engine.loaders import Batches
from kdrun.engine.teacher_cache import check_cacheable
from kdrun.errors import KdrunError

SIZE = 16
# Odd and even differences to the stored side (18 for 16 px), wide and tall images: every centre-crop rounding.
SHAPES = [(40, 30), (30, 53), (18, 18), (25, 19), (64, 47), (19, 33)]


def _smooth_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator) * 255
    pixels = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array).convert(mode)


def _folder(root, count_per_class: int = 3):
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count_per_class):
                width, height = SHAPES[(i + 3 * label) % len(SHAPES)]
                _smooth_image(100 * label + i + (50 if split == "val" else 0), width, height).save(
                    root / split / name / f"{i}.png")
    return root


def _cfg(root, pack_dir, **extra):
    return {"name": "imagefolder", "root": str(root), "image_size": SIZE, "num_workers": 0, "pack": True,
            "pack_dir": str(pack_dir), **extra}


def _entries(pack_dir, split: str) -> list:
    return sorted(p for p in pack_dir.iterdir() if p.is_dir() and f"-{split}-" in p.name)


def test_packed_evaluation_images_and_labels_are_the_pil_paths(tmp_path):
    root = _folder(tmp_path / "data")
    pil = build_dataset(_cfg(root, tmp_path / "packs", pack=False))
    packed = build_dataset(_cfg(root, tmp_path / "packs"))
    assert isinstance(packed.test, PackedDataset) and packed.class_names == pil.class_names == ["cat", "dog"]
    assert (packed.num_classes, packed.image_size, packed.in_chans) == (pil.num_classes, pil.image_size, 3)
    for split in ("test", "train"):
        if split == "train":  # without augmentation the training split is the evaluation view too
            pil = build_dataset(_cfg(root, tmp_path / "packs", pack=False, augment=False))
            packed = build_dataset(_cfg(root, tmp_path / "packs", augment=False))
        expected, got = getattr(pil, split), getattr(packed, split)
        assert len(expected) == len(got) == 6
        for i in range(len(expected)):
            image, label, index = got[i]
            reference, reference_label, _ = expected[i]
            assert (label, index) == (reference_label, i)
            # The same uint8 pixels, normalized by a folded scale instead of ToTensor + Normalize.
            assert image.shape == (3, SIZE, SIZE) and torch.allclose(image, reference, atol=1e-5), (split, i)


def test_pack_stores_the_evaluation_resize_as_a_square(tmp_path):
    root = _folder(tmp_path / "data", count_per_class=1)
    packed = build_dataset(_cfg(root, tmp_path / "packs"))
    side = pack_side(SIZE)
    assert side == 18 and packed.train.images.shape == (2, 3, side, side) and packed.train.images.dtype == torch.uint8
    train, test = _entries(tmp_path / "packs", "train"), _entries(tmp_path / "packs", "val")
    assert len(train) == len(test) == 1
    assert np.load(train[0] / "labels.npy").tolist() == [0, 1]


@pytest.mark.parametrize("box", [(0, 0, 256, 256), (10, 20, 200, 180), (50, 60, 80, 100), (5, 5, 240, 250)])
def test_crop_and_resize_match_pil_within_tolerance(box):
    """A fixed box resized to 224 against torchvision's resized_crop on the PIL image (bilinear, antialiased):
    the CPU path (torch's uint8 antialiased resize) within one level; the GPU path (roi_align) within a mean
    of one level and 3 levels at the 99th percentile (its antialiasing averages bilinear samples)."""
    images = torch.stack([torch.from_numpy(np.array(_smooth_image(seed, 256, 256))).permute(2, 0, 1)
                          for seed in range(3)])
    top, left, h, w = box
    reference = torch.stack([torch.from_numpy(np.array(TF.resized_crop(
        Image.fromarray(image.permute(1, 2, 0).numpy()), top, left, h, w, [224, 224]))).permute(2, 0, 1)
        for image in images]).float()
    boxes = torch.tensor([box] * 3, dtype=torch.float32)
    cpu = resize_boxes_per_image(images, boxes, 224).float()
    assert (cpu - reference).abs().max() <= 1
    gpu_path = (resize_boxes_roi_align(images, boxes, 224).float() - reference).abs()
    assert gpu_path.mean() <= 1.0 and gpu_path.flatten().quantile(0.99) <= 3


def test_random_boxes_follow_torchvisions_rule():
    torch.manual_seed(0)
    for height, width in [(256, 256), (18, 40), (200, 20)]:  # the last: most tries do not fit, some fall back
        top, left, h, w = sample_boxes(20_000, height, width, torch.device("cpu")).unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        area = h * w / (height * width)
        aspect = w / h
        fitted = area < 1  # fallbacks cover the whole image or its clamped aspect
        assert area.max() <= 1 and (area[fitted] >= SCALE[0] - 0.05).all()
        slack = 2 / min(height, width)  # rounding h and w to whole pixels
        assert (aspect[fitted] >= RATIO[0] * (1 - slack) - 0.02).all() and (aspect[fitted] <= RATIO[1] * (1 + slack) + 0.02).all()
    flips = RandomResizedCropFlip(8)
    image = torch.arange(16, dtype=torch.uint8).repeat(4000, 3, 16, 1)  # columns 0..15: a flip reverses them
    out = flips(image)
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float().mean().item()
    assert abs(flipped - 0.5) < 0.03


def test_training_batches_are_cropped_normalized_and_the_cache_refuses_only_random_crops(tmp_path):
    root = _folder(tmp_path / "data")
    bundle = build_dataset(_cfg(root, tmp_path / "packs"))
    torch.manual_seed(0)
    batches = list(Batches(bundle.train, 4, torch.device("cpu"), shuffle=True, epoch=1))
    images, labels, indices = batches[0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(6))
    assert torch.equal(labels, bundle.train.labels[indices])
    with pytest.raises(KdrunError, match="augments them at random"):
        check_cacheable(bundle.train, "imagefolder")
    check_cacheable(build_dataset(_cfg(root, tmp_path / "packs", augment=False)).train, "imagefolder")


def test_the_pack_is_reused_then_rebuilt_when_a_file_changes(tmp_path):
    root, packs = _folder(tmp_path / "data"), tmp_path / "packs"
    build_dataset(_cfg(root, packs))
    (first,) = _entries(packs, "train")
    stamp = (first / "images.npy").stat().st_mtime_ns
    build_dataset(_cfg(root, packs))
    assert _entries(packs, "train") == [first] and (first / "images.npy").stat().st_mtime_ns == stamp  # reused

    changed = root / "train" / "dog" / "1.png"
    _smooth_image(999, 30, 53).save(changed)
    os.utime(changed, ns=(stamp + 10**9, stamp + 10**9))
    rebuilt = build_dataset(_cfg(root, packs, augment=False))
    (second,) = _entries(packs, "train")
    assert second != first and not first.exists()  # the superseded pack is deleted
    assert len(_entries(packs, "val")) == 1        # the untouched split keeps its pack
    pil = build_dataset(_cfg(root, packs, pack=False, augment=False))
    position = [os.path.relpath(path, root) for path, _ in pil.train.base.samples].index("train/dog/1.png")
    assert torch.allclose(rebuilt.train[position][0], pil.train[position][0], atol=1e-5)  # the new pixels

    _smooth_image(7, 20, 20).save(root / "train" / "cat" / "new.png")  # an added image
    assert len(build_dataset(_cfg(root, packs)).train) == 7 and len(_entries(packs, "train")) == 1


def test_an_incomplete_pack_is_rebuilt(tmp_path):
    root, packs = _folder(tmp_path / "data"), tmp_path / "packs"
    build_dataset(_cfg(root, packs))
    (entry,) = _entries(packs, "train")
    (entry / "manifest.json").unlink()
    assert len(build_dataset(_cfg(root, packs)).train) == 6 and (entry / "manifest.json").exists()


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(KdrunError, match=r"dataset.pack_dir=.*a_file cannot hold the packed images") as err:
        build_dataset(_cfg(root, blocker))
    assert "\n" not in str(err.value)
    with pytest.raises(KdrunError, match="dataset.pack='yes' must be true or false"):
        build_dataset(_cfg(root, tmp_path / "packs", pack="yes"))

    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    with pytest.raises(KdrunError, match=r"cannot decode image .*broken.png") as err:
        build_dataset(_cfg(root, tmp_path / "packs", num_workers=1))  # raised in a worker, reported as one line
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert not [p for p in (tmp_path / "packs").iterdir() if "-train-" in p.name and p.is_dir()]  # nothing half-built kept
    (root / "train" / "cat" / "broken.png").unlink()

    monkeypatch.setattr(packed_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 100))
    with pytest.raises(KdrunError, match=r"dataset.pack=true needs .* GB in .*, 0.0 GB are free: pass dataset.pack_dir"):
        build_dataset(_cfg(root, tmp_path / "other_packs"))


def test_a_pack_bigger_than_memory_stays_on_the_host_when_batches_go_to_a_device(tmp_path):
    root = _folder(tmp_path / "data")
    train = build_dataset(_cfg(root, tmp_path / "packs")).train
    moved = train.to("cpu")
    assert moved.images.data_ptr() == train.images.data_ptr()  # the memory map itself, not a copy
    assert math.isclose(float(moved._scale.flatten()[0]), float(train._scale.flatten()[0]))
