"""Any ImageNet-style folder (ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg) via torchvision's
ImageFolder and PIL transforms. Layout problems are checked up front and reported as one-line
KdrunErrors naming the folder; an image that fails to decode names its file.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Mapping

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from kdrun.config.groups import ImageFolderDataset
from kdrun.data.bundle import DataBundle, Item
from kdrun.data.options import (absolute_path, read_options, require_bool, require_channel_stats,
                                require_int)
from kdrun.data.packed import packed_bundle, wants_pack
from kdrun.data.registry import DATASETS
from kdrun.errors import KdrunError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale folders default to the average of ImageNet's channels.
GRAYSCALE_MEAN = (0.449,)
GRAYSCALE_STD = (0.226,)

PIL_MODES = {1: "L", 3: "RGB"}
ACCEPTED_EXTENSIONS = ", ".join(IMG_EXTENSIONS)
MAX_NAMES_IN_MESSAGE = 5


@DATASETS.register("imagefolder", schema=ImageFolderDataset)
def build_imagefolder(cfg: Mapping[str, Any]) -> DataBundle:
    options = read_options("imagefolder", cfg, ImageFolderDataset)  # mean/std None: ImageNet's (grayscale: averaged)
    if options["root"] is None:
        raise KdrunError("dataset.root is required for imagefolder: pass dataset.root=PATH with train/ and val/ subfolders")
    root = absolute_path(options["root"])
    size = require_int("image_size", options["image_size"], minimum=1)
    augment = require_bool("augment", options["augment"])
    in_chans = require_int("in_chans", options["in_chans"], minimum=1)
    if in_chans not in PIL_MODES:
        raise KdrunError(f"dataset.in_chans={in_chans} is not supported for imagefolder: pass dataset.in_chans=3 (RGB) "
                         f"or dataset.in_chans=1 (grayscale)")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAYSCALE_MEAN, GRAYSCALE_STD)
    mean = require_channel_stats("mean", options["mean"] or default_mean, in_chans)
    std = require_channel_stats("std", options["std"] or default_std, in_chans)

    if not os.path.isdir(root):
        raise KdrunError(f"dataset.root={root} does not exist or is not a folder: pass dataset.root=PATH "
                         f"pointing at a folder with {options['train_dir']}/ and {options['val_dir']}/ subfolders")
    train_dir = _split_dir(root, "train_dir", options["train_dir"])
    val_dir = _split_dir(root, "val_dir", options["val_dir"])
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if train_classes != val_classes:
        raise KdrunError(f"class folders differ between {train_dir} and {val_dir} "
                         f"(only in {options['train_dir']}: {_names(set(train_classes) - set(val_classes))}; "
                         f"only in {options['val_dir']}: {_names(set(val_classes) - set(train_classes))}): "
                         f"give both the same class subfolders")

    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_transform = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                         *normalize])
    train_transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                          *normalize]) if augment else eval_transform
    loader = partial(load_image, mode=PIL_MODES[in_chans])
    train = _image_folder(train_dir, train_transform, loader)
    test = _image_folder(val_dir, eval_transform, loader)
    if wants_pack(options):  # decoded once into memory-mapped uint8 files, cropped on the device
        return packed_bundle(train, test, options, size, augment, in_chans, mean, std)
    return DataBundle(name="imagefolder", train=IndexedDataset(train), test=IndexedDataset(test),
                      num_classes=len(train.classes), in_chans=in_chans, image_size=(size, size),
                      class_names=list(train.classes), mean=mean, std=std)


class IndexedDataset(Dataset):
    """Adds the item's position as the third element: (image, label) -> (image, label, index)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Item:
        image, label = self.base[i]
        return image, int(label), int(i)


class _VisibleImageFolder(ImageFolder):
    # Hidden folders (.ipynb_checkpoints, .DS_Store dirs) are never classes.
    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}


def load_image(path: str, mode: str) -> Image.Image:
    """PIL's loader, but a file that will not decode is a KdrunError naming it."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert(mode)  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise KdrunError(f"cannot decode image {path} ({one_line(err)}): delete or replace the file") from err


def _split_dir(root: str, key: str, name: Any) -> str:
    path = os.path.join(root, str(name))
    if not os.path.isdir(path):
        raise KdrunError(f"{path} not found: create it with one subfolder per class, or point dataset.{key}=NAME "
                         f"at the subfolder of {root} that holds the {'training' if key == 'train_dir' else 'validation'} images")
    return path


def _class_folders(split_dir: str) -> list[str]:
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise KdrunError(f"no class subfolders in {split_dir}: put each class's images in {split_dir}/<class_name>/ "
                         f"(accepted extensions: {ACCEPTED_EXTENSIONS})")
    return classes


def _image_folder(split_dir: str, transform, loader) -> ImageFolder:
    try:
        return _VisibleImageFolder(split_dir, transform=transform, loader=loader)
    except FileNotFoundError as err:  # some class folder holds no file with an accepted extension
        empty = [name for name in _class_folders(split_dir) if not _has_image(os.path.join(split_dir, name))]
        raise KdrunError(f"no images found in {_names([os.path.join(split_dir, name) for name in empty])} "
                         f"(accepted extensions: {ACCEPTED_EXTENSIONS}): add images or remove the empty class "
                         f"folder(s)") from err


def _has_image(folder: str) -> bool:
    return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


def _names(names) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    return shown + (f" and {len(names) - MAX_NAMES_IN_MESSAGE} more" if len(names) > MAX_NAMES_IN_MESSAGE else "")
