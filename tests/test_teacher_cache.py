"""Teacher-output cache: same losses as a live teacher, no teacher call while training, reuse, atomic writes."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms

from kdrun.config.schema import register_configs
from kdrun.data import build_dataset
from kdrun.data.augment import RandomCropFlip
from kdrun.engine import teacher_cache
from kdrun.engine.speed import Speed
from kdrun.engine.teacher_cache import cache_spec, check_cacheable, load_or_build
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.paths import conf_dir
from kdrun.stages.context import RunContext
from kdrun.stages.roles import distill_student

register_configs()
TEACHER = "cifar:resnet14"
STUDENT = "cifar:resnet8"
TRAIN_SIZE, BATCH = 96, 32


def context(tmp_path, method: str, cache: bool) -> RunContext:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"distill={method}", "dataset=synthetic", "dataset.image_size=16", f"dataset.train_size={TRAIN_SIZE}",
            "dataset.test_size=32", f"teacher.name={TEACHER}", f"student.name={STUDENT}", "epochs=1",
            f"batch_size={BATCH}", "optim=sgd", "lr=0.05", "progress=false", f"cache_dir={tmp_path.parent / 'cache'}",
            f"teacher.cache={str(cache).lower()}"])
    return RunContext(cfg, build_dataset(cfg.dataset), torch.device("cpu"), tmp_path, progress=False)


def fixed_teacher() -> nn.Module:
    torch.manual_seed(7)
    return create_model(TEACHER, 10, 3)


class CallCounter:
    """Counts the teacher's passes: every one goes through its first convolution (also via feature taps)."""

    def __init__(self, teacher: nn.Module):
        self.calls = 0
        conv = next(m for m in teacher.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "fitnets"])
def test_cache_gives_the_live_teacher_losses_without_calling_it(tmp_path, method):
    steps = TRAIN_SIZE // BATCH  # 1 epoch
    teacher = fixed_teacher()
    counter = CallCounter(teacher)
    live = distill_student(context(tmp_path / "live", method, cache=False), teacher, 0.5)
    live_calls = counter.calls

    counter.calls = 0
    first = distill_student(context(tmp_path / "first", method, cache=True), teacher, 0.5)
    first_calls = counter.calls
    counter.calls = 0
    second = distill_student(context(tmp_path / "second", method, cache=True), teacher, 0.5)
    reuse_calls = counter.calls

    # Training never runs the teacher: only the one pass over the training set that fills the cache
    # (and, for feature methods, the shape probes that happen before training in both cases).
    probes = live_calls - steps
    assert reuse_calls == probes
    assert first_calls == probes + TRAIN_SIZE // BATCH
    for cached in (first, second):
        for live_epoch, cached_epoch in zip(live.result.history, cached.result.history):
            for key in [k for k in live_epoch if k.startswith("loss")]:
                assert cached_epoch[key] == pytest.approx(live_epoch[key], rel=2e-3, abs=1e-4), (key, method)
    drop_time = [{k: v for k, v in h.items() if k != "seconds"} for h in (first.result.history + second.result.history)]
    assert drop_time[:len(first.result.history)] == drop_time[len(first.result.history):]  # the same numbers
    entries = list((tmp_path / "cache" / "teacher_outputs").iterdir())
    assert len([e for e in entries if e.is_dir()]) == 1 and not [e for e in entries if e.name.startswith(".")
                                                                 and e.is_dir()]


def test_second_load_reuses_the_entry_and_reads_rows_by_index(tmp_path):
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 40, "test_size": 8})
    teacher = fixed_teacher().eval()
    counter = CallCounter(teacher)
    spec = cache_spec(TEACHER, teacher, {"name": "synthetic"}, data.train, None, Speed())
    first = load_or_build(tmp_path, spec, teacher, None, data.train, 16, torch.device("cpu"), Speed(), 64)
    assert not first.reused and counter.calls == 3  # 40 images in batches of 16
    logits_file = first.directory / "logits.npy"
    stamp = logits_file.stat().st_mtime_ns
    second = load_or_build(tmp_path, spec, teacher, None, data.train, 16, torch.device("cpu"), Speed(), 64)
    assert second.reused and counter.calls == 3 and logits_file.stat().st_mtime_ns == stamp
    assert np.load(logits_file, mmap_mode="r").dtype == np.float16 and second.logits.shape == (40, 10)
    indices = torch.tensor([39, 0, 17])
    with torch.no_grad():
        expected = teacher(data.train.batch(indices)[0])
    got = second.logits_for(indices)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-3, atol=2e-3)  # float16 storage


def test_key_follows_teacher_weights_dataset_and_precision():
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 40, "test_size": 8})
    teacher = fixed_teacher()
    base = cache_spec(TEACHER, teacher, {"name": "synthetic"}, data.train, None, Speed())
    assert cache_spec(TEACHER, fixed_teacher(), {"name": "synthetic"}, data.train, None, Speed()) == base
    other_teacher = create_model(TEACHER, 10, 3)
    assert cache_spec(TEACHER, other_teacher, {"name": "synthetic"}, data.train, None, Speed()) != base
    assert cache_spec(TEACHER, teacher, {"name": "synthetic", "seed": 1}, data.train, None, Speed()) != base
    assert cache_spec(TEACHER, teacher, {"name": "synthetic"}, data.train, None, Speed("bf16")) != base


def test_a_failed_build_leaves_no_entry_and_the_next_one_succeeds(tmp_path, monkeypatch):
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 40, "test_size": 8})
    teacher = fixed_teacher().eval()
    spec = cache_spec(TEACHER, teacher, {"name": "synthetic"}, data.train, None, Speed())
    calls = []
    real = teacher_cache._teacher_outputs

    def dies_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the run were stopped mid-write
        return real(*args)

    monkeypatch.setattr(teacher_cache, "_teacher_outputs", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        load_or_build(tmp_path, spec, teacher, None, data.train, 16, torch.device("cpu"), Speed(), 64)
    folder = tmp_path / "teacher_outputs"
    assert [p.name for p in folder.iterdir() if p.is_dir()] == []  # neither the entry nor its temporary folder
    stale = folder / f".{teacher_cache.stage_key(spec)}.tmp99999999"
    stale.mkdir()  # what a SIGKILL mid-write would leave
    monkeypatch.setattr(teacher_cache, "_teacher_outputs", real)
    outputs = load_or_build(tmp_path, spec, teacher, None, data.train, 16, torch.device("cpu"), Speed(), 64)
    assert not outputs.reused and len(outputs) == 40 and not stale.exists()


def test_over_budget_is_refused_with_the_setting_to_change(tmp_path):
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 40, "test_size": 8})
    teacher = fixed_teacher()
    spec = cache_spec(TEACHER, teacher, {"name": "synthetic"}, data.train, None, Speed())
    with pytest.raises(KdrunError, match=r"need 0 MB, over teacher.cache_max_mb=1e-06: raise teacher.cache_max_mb"):
        load_or_build(tmp_path, spec, teacher, None, data.train, 16, torch.device("cpu"), Speed(), 1e-6)
    assert not [p for p in (tmp_path / "teacher_outputs").iterdir() if p.is_dir()]


class _FolderLike(Dataset):
    """Stands in for an image folder: what the check reads is the transform."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 1


def test_random_training_transforms_are_refused_with_the_fix():
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 40, "test_size": 8})
    check_cacheable(data.train, "synthetic")  # not augmented: fine
    augmented = type(data.train)(data.train.images, data.train.labels, data.train.mean, data.train.std,
                                 augment=RandomCropFlip(4))
    with pytest.raises(KdrunError) as error:
        check_cacheable(augmented, "cifar10")
    message = str(error.value)
    assert "\n" not in message and "pass dataset.augment=false" in message and "RandomCropFlip" in message
    with pytest.raises(KdrunError, match="dataset.augment=false"):
        check_cacheable(_FolderLike(transforms.Compose([transforms.RandomResizedCrop(8), transforms.ToTensor()])),
                        "imagefolder")
    check_cacheable(_FolderLike(transforms.Compose([transforms.Resize(8), transforms.ToTensor()])), "imagefolder")
