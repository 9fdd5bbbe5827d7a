"""kdrun.data: fast, CPU only, no network (torchvision downloads are faked or never reached)."""
from __future__ import annotations

import os
import pickle
import socket
from urllib.error import URLError

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets

from kdrun.data import DataBundle, InMemoryDataset, build_dataset, dataset_names, describe
from kdrun.data.augment import RandomCropFlip
from kdrun.data.embedded import stratified_split
from kdrun.errors import KdrunError


def assert_one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_item_format(dataset, in_chans: int, size: tuple[int, int], num_classes: int) -> None:
    for position in (0, len(dataset) - 1):
        image, label, index = dataset[position]
        assert image.dtype == torch.float32 and image.shape == (in_chans, *size)
        assert type(label) is int and 0 <= label < num_classes
        assert type(index) is int and index == position


# --- embedded: mnist5k, digits -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist5k() -> DataBundle:
    return build_dataset({"name": "mnist5k"})


def test_mnist5k_sizes_and_format(mnist5k):
    assert (len(mnist5k.train), len(mnist5k.test)) == (4000, 1000)
    assert (mnist5k.num_classes, mnist5k.in_chans, mnist5k.image_size) == (10, 1, (28, 28))
    assert mnist5k.class_names == [str(d) for d in range(10)]
    assert isinstance(mnist5k.train, InMemoryDataset) and isinstance(mnist5k.test, InMemoryDataset)
    assert mnist5k.train.images.dtype == torch.uint8 and mnist5k.train.images.shape[1:] == (1, 28, 28)
    assert set(mnist5k.test.labels.tolist()) == set(range(10))  # stratified: every class in test
    assert describe(mnist5k) == "mnist5k: 4000 train / 1000 test, 10 classes, 1x28x28"
    assert_item_format(mnist5k.train, 1, (28, 28), 10)
    assert_item_format(mnist5k.test, 1, (28, 28), 10)
    # Normalized with train statistics: the train split has mean ~0, std ~1.
    train_images, _, _ = mnist5k.train.batch(torch.arange(len(mnist5k.train)))
    assert abs(train_images.mean().item()) < 1e-3 and abs(train_images.std().item() - 1) < 1e-3


def test_mnist5k_split_is_deterministic(mnist5k):
    again = build_dataset({"name": "mnist5k", "test_fraction": 0.2, "split_seed": 0})
    assert torch.equal(again.train.images, mnist5k.train.images)
    assert torch.equal(again.test.labels, mnist5k.test.labels)
    other_seed = build_dataset({"name": "mnist5k", "split_seed": 1})
    assert not torch.equal(other_seed.test.images, mnist5k.test.images)


def test_stratified_split_indices():
    labels = np.repeat(np.arange(5), 20)
    train_a, test_a = stratified_split(labels, 0.2, 7)
    train_b, test_b = stratified_split(labels, 0.2, 7)
    assert np.array_equal(train_a, train_b) and np.array_equal(test_a, test_b)
    assert sorted(np.concatenate([train_a, test_a]).tolist()) == list(range(100))
    assert np.bincount(labels[test_a]).tolist() == [4] * 5
    assert not np.array_equal(stratified_split(labels, 0.2, 8)[1], test_a)


def test_digits_shape():
    bundle = build_dataset({"name": "digits"})
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert (bundle.in_chans, bundle.image_size, bundle.num_classes) == (1, (8, 8), 10)
    assert bundle.train.images.max() == 255  # 0..16 rescaled to 0..255
    assert_item_format(bundle.test, 1, (8, 8), 10)


def test_bad_split_options_are_one_line_errors():
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "digits", "test_fraction": 1.5})
    assert_one_line_error(excinfo, "dataset.test_fraction")
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "digits", "test_fraction": 0.001})  # fewer test samples than classes
    assert_one_line_error(excinfo, "dataset.test_fraction")
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "digits", "tets_fraction": 0.1})
    assert_one_line_error(excinfo, "dataset.tets_fraction", "test_fraction")


# --- InMemoryDataset and its augmentation ---------------------------------------------------------

def small_in_memory(augment=None) -> InMemoryDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=generator)
    return InMemoryDataset(images, torch.arange(6) % 3, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125), augment=augment)


def test_batch_equals_stacked_items():
    dataset = small_in_memory()
    idx = torch.tensor([4, 0, 2])
    images, labels, indices = dataset.batch(idx)
    items = [dataset[i] for i in idx.tolist()]
    assert torch.allclose(images, torch.stack([item[0] for item in items]))
    assert labels.tolist() == [item[1] for item in items] and indices.tolist() == [4, 0, 2]
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    assert torch.allclose(images[0], (dataset.images[4].float() / 255 - mean) / std, atol=1e-5)
    assert dataset[-1][2] == 5
    with pytest.raises(IndexError):
        dataset[6]


def test_random_crop_flip_gives_crops_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (32, 2, 6, 6), dtype=torch.uint8)  # no zeros, so padding is visible
    out = RandomCropFlip(padding=2)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for source, crop in zip(padded, out):
        candidates = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                      if torch.equal(crop, (lambda c: c.flip(-1) if flip else c)(source[:, top:top + 6, left:left + 6]))]
        assert candidates
        flips += any(flip for _, _, flip in candidates) and not any(not flip for _, _, flip in candidates)
    assert 0 < flips < 32  # both flipped and unflipped images occur


# --- synthetic -----------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_balanced():
    first = build_dataset({"name": "synthetic"})
    second = build_dataset(OmegaConf.create({"name": "synthetic", "seed": 0}))  # DictConfig works too
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    assert (len(first.train), len(first.test), first.num_classes, first.in_chans, first.image_size) == (256, 64, 10, 3, (32, 32))
    assert torch.bincount(first.test.labels).tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    other = build_dataset({"name": "synthetic", "seed": 1})
    assert not torch.equal(first.train.images, other.train.images)
    small = build_dataset({"name": "synthetic", "num_classes": 3, "train_size": 12, "test_size": 6,
                           "image_size": 8, "in_chans": 1})
    assert_item_format(small.train, 1, (8, 8), 3)


def test_synthetic_is_learnable_by_nearest_class_mean():
    bundle = build_dataset({"name": "synthetic"})
    train_images, train_labels, _ = bundle.train.batch(torch.arange(len(bundle.train)))
    test_images, test_labels, _ = bundle.test.batch(torch.arange(len(bundle.test)))
    centroids = torch.stack([train_images[train_labels == k].mean(0) for k in range(bundle.num_classes)])
    predictions = torch.cdist(test_images.flatten(1), centroids.flatten(1)).argmin(1)
    assert (predictions == test_labels).float().mean() > 0.9


# --- torchvision datasets ------------------------------------------------------------------------

def write_cifar10_layout(root, per_batch: int = 4, test_count: int = 6) -> None:
    """torchvision's cifar-10-batches-py format: pickled dicts of (N, 3072) uint8 rows + labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write_batch(name: str, count: int) -> None:
        batch = {"data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)

    for i in range(1, 6):
        write_batch(f"data_batch_{i}", per_batch)
    write_batch("test_batch", test_count)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, file)


def test_cifar10_missing_files_says_where_and_how(tmp_path):
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert_one_line_error(excinfo, "cifar10", os.path.join(str(tmp_path), "cifar-10-batches-py"),
                          "dataset.download=true", "dataset.root=")


def test_mnist_missing_files_names_its_raw_folder(tmp_path):
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "mnist", "root": str(tmp_path)})
    assert_one_line_error(excinfo, os.path.join(str(tmp_path), "MNIST", "raw"), "download")


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    def offline_download(self):
        raise URLError("[Errno -3] Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline_download)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "cifar10", "root": str(tmp_path), "download": True})
    assert_one_line_error(excinfo, "downloading cifar10", "failed", os.path.join(str(tmp_path), "cifar-10-batches-py"))
    assert socket.getdefaulttimeout() == timeout_before


def test_cifar10_from_a_local_layout(tmp_path, monkeypatch):
    write_cifar10_layout(tmp_path)
    # Self-written files cannot match the real md5s; the builder itself keeps torchvision's checks.
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    bundle = build_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (20, 6, 10)
    assert (bundle.in_chans, bundle.image_size) == (3, (32, 32))
    assert bundle.class_names == [f"c{k}" for k in range(10)]
    assert isinstance(bundle.train.augment, RandomCropFlip) and bundle.test.augment is None
    assert_item_format(bundle.train, 3, (32, 32), 10)
    plain = build_dataset({"name": "cifar10", "root": str(tmp_path), "augment": False})
    assert plain.train.augment is None
    # Same pixels as torchvision's own (HWC) arrays.
    source = datasets.CIFAR10(str(tmp_path), train=False)
    assert torch.equal(plain.test.images, torch.from_numpy(source.data).permute(0, 3, 1, 2))


# --- imagefolder ---------------------------------------------------------------------------------

def write_image_folder(root, classes=("cat", "dog"), per_class: int = 3, size=(20, 30)) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_builds(tmp_path):
    write_image_folder(tmp_path)
    bundle = build_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 16})
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (6, 6, 2)
    assert bundle.class_names == ["cat", "dog"] and bundle.image_size == (16, 16) and bundle.in_chans == 3
    assert_item_format(bundle.train, 3, (16, 16), 2)
    assert_item_format(bundle.test, 3, (16, 16), 2)
    gray = build_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "in_chans": 1,
                          "augment": False})
    assert_item_format(gray.train, 1, (8, 8), 2)
    assert describe(gray) == "imagefolder: 6 train / 6 test, 2 classes, 1x8x8"


@pytest.mark.parametrize("case", ["no_root", "missing_root", "no_train", "no_val", "no_classes", "empty_class",
                                  "class_mismatch"])
def test_imagefolder_layout_errors(tmp_path, case):
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 16}
    expected = [str(tmp_path)]
    if case == "no_root":
        cfg["root"], expected = None, ["dataset.root is required", "dataset.root=PATH"]
    elif case == "missing_root":
        cfg["root"], expected = str(tmp_path / "nowhere"), [str(tmp_path / "nowhere"), "dataset.root=PATH"]
    else:
        write_image_folder(tmp_path)
        if case == "no_train":
            os.rename(tmp_path / "train", tmp_path / "training")
            expected = [str(tmp_path / "train"), "dataset.train_dir"]
        elif case == "no_val":
            os.rename(tmp_path / "val", tmp_path / "validation")
            expected = [str(tmp_path / "val"), "dataset.val_dir"]
        elif case == "no_classes":
            for name in ("cat", "dog"):
                for file in (tmp_path / "val" / name).iterdir():
                    file.unlink()
                (tmp_path / "val" / name).rmdir()
            expected = [f"no class subfolders in {tmp_path / 'val'}", ".png"]
        elif case == "empty_class":
            for file in (tmp_path / "train" / "dog").iterdir():
                file.rename(file.with_suffix(".txt"))
            expected = [str(tmp_path / "train" / "dog"), ".jpg"]
        elif case == "class_mismatch":
            os.rename(tmp_path / "val" / "dog", tmp_path / "val" / "bird")
            expected = ["only in train: dog", "only in val: bird"]
    with pytest.raises(KdrunError) as excinfo:
        build_dataset(cfg)
    assert_one_line_error(excinfo, *expected)


def test_imagefolder_undecodable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "cat" / "0.png"
    broken.write_bytes(b"not a png")
    bundle = build_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 16})
    with pytest.raises(KdrunError) as excinfo:
        bundle.train[0]
    assert_one_line_error(excinfo, str(broken))


# --- names ---------------------------------------------------------------------------------------

def test_unknown_dataset_suggests_a_close_match():
    assert dataset_names() == sorted(["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "mnist",
                                      "mnist5k", "synthetic"])
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "cifar-10"})
    assert_one_line_error(excinfo, "unknown dataset 'cifar-10'", "mnist5k", "did you mean 'cifar10'?")
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "zzzz"})
    assert "did you mean" not in assert_one_line_error(excinfo, "choose one of")


def test_runner_keys_are_accepted_and_unknown_keys_rejected(tmp_path):
    write_image_folder(tmp_path)
    build_dataset({"name": "imagefolder", "root": str(tmp_path), "num_workers": 2, "image_size": 16})
    with pytest.raises(KdrunError) as excinfo:
        build_dataset({"name": "synthetic", "image_szie": 8})
    assert_one_line_error(excinfo, "dataset.image_szie", "image_size")


# The dataset keys a stage-cache key held before `val_split` and `pack` existed: entries written then must
# still match a run that does not use them (a changed key would retrain every cached teacher once).
KEYS_BEFORE_HOLDOUT_AND_PACK = {
    "embedded": ["name", "split_seed", "test_fraction"],
    "torchvision": ["augment", "download", "name", "root"],
    "imagefolder": ["augment", "image_size", "in_chans", "mean", "name", "num_workers", "root", "std", "train_dir",
                    "val_dir"],
    "synthetic": ["image_size", "in_chans", "name", "num_classes", "seed", "test_size", "train_size"],
}


def test_stage_cache_keys_leave_out_newer_dataset_keys_at_their_neutral_values():
    from kdrun.config.groups import SCHEMAS, schema_defaults
    from kdrun.data.options import cache_key_options

    assert sorted(SCHEMAS["dataset"]) == sorted(KEYS_BEFORE_HOLDOUT_AND_PACK)
    for family, schema in SCHEMAS["dataset"].items():
        defaults = {**schema_defaults(schema), "name": family}
        assert sorted(cache_key_options(defaults)) == KEYS_BEFORE_HOLDOUT_AND_PACK[family], family
    held_out = cache_key_options({"name": "mnist5k", "val_split": 0.1, "val_split_seed": 3})
    assert held_out == {"name": "mnist5k", "val_split": 0.1, "val_split_seed": 3}  # a holdout changes the training set
    packed = cache_key_options({"name": "imagefolder", "pack": True, "pack_dir": "/fast/disk"})
    assert packed == {"name": "imagefolder", "pack": True}  # where the pack lives changes nothing trained
