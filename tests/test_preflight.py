"""The run's preflight (kdrun/run/preflight.py): before any stage trains, every model of the run takes one
training step, so what cannot train fails at once, as one line, with nothing written; and the run's results
are the same with or without it."""
import random

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from kdrun.config.schema import register_configs
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()

TINY = ["dataset=synthetic", "dataset.image_size=16", "dataset.train_size=96", "dataset.test_size=32",
        "teacher.name=cifar:resnet14", "student.name=cifar:resnet8", "epochs=1", "batch_size=32", "optim=sgd",
        "lr=0.05", "progress=false", "tb_figures=0"]


@pytest.fixture
def cfg_of(tmp_path):
    def compose_tiny(*overrides):
        base = TINY
        if any(o.startswith("dataset=") for o in overrides):  # another dataset: without the synthetic one's keys
            base = [a for a in TINY if not a.startswith("dataset")]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=[*base, f"cache_dir={tmp_path / 'cache'}", *overrides])
    return compose_tiny


@pytest.fixture
def build(cfg_of, tmp_path):
    """build(*overrides): the run's context, built as run_experiment builds it (preflight included)."""
    from kdrun.run.pipeline import build_context

    def build_tiny(*overrides):
        return build_context(cfg_of(*overrides), tmp_path / "run")
    return build_tiny


def preflight_error(build, *overrides) -> str:
    with pytest.raises(KdrunError) as raised:
        build(*overrides)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_every_registered_paradigm_says_what_it_trains():
    """Each paradigm registers its preflight steps with itself (`@PARADIGMS.register(name, preflight=...)`)."""
    from kdrun.paradigms import PARADIGMS

    assert [name for name in PARADIGMS.names() if not callable(PARADIGMS.info(name).get("preflight"))] == []


@pytest.mark.parametrize(("overrides", "labels"), [
    ([], ["teacher cifar:resnet14", "student cifar:resnet8 (baseline)", "student cifar:resnet8"]),
    (["baseline=false"], ["teacher cifar:resnet14", "student cifar:resnet8"]),
    (["paradigm=teacher"], ["teacher cifar:resnet14"]),
    (["paradigm=baseline"], ["student cifar:resnet8 (baseline)"]),
    (["paradigm=online", "paradigm.peers=[cifar:resnet8,cifar:wrn_16_1]"],
     ["peers cifar:resnet8, cifar:wrn_16_1", "student cifar:resnet8 (baseline)", "student cifar:wrn_16_1 (baseline)"]),
    (["paradigm=multi_teacher", "teachers=[cifar:resnet14,cifar:resnet20]", "baseline=false"],
     ["teacher cifar:resnet14", "teacher cifar:resnet20", "student cifar:resnet8"]),
    (["paradigm=assistant", "assistant.name=cifar:resnet20", "baseline=false"],
     ["teacher cifar:resnet14", "assistant cifar:resnet20", "student cifar:resnet8 (from the assistant)"]),
    (["paradigm=self"], ["teacher cifar:resnet14", "generation 1 cifar:resnet14"]),
])
def test_each_paradigm_steps_every_model_it_trains(build, overrides, labels, monkeypatch):
    from kdrun.run import preflight

    taken = []
    original = preflight.take_step
    monkeypatch.setattr(preflight, "take_step", lambda ctx, step, *rest: (taken.append(step.label),
                                                                           original(ctx, step, *rest)))
    build(*overrides)
    assert taken == labels


@pytest.mark.parametrize(("overrides", "expected"), [
    # a student that cannot take the image size (the teacher would have trained first)
    (["student.name=cifar:vgg8", "dataset.image_size=4"],
     "student cifar:vgg8 (baseline) fails a training step on a batch of 2 3x4x4 images: Given input size"),
    (["student.name=cifar:vgg8", "dataset.image_size=4", "baseline=false"], "pass a larger dataset.image_size (now 4)"),
    # BatchNorm on batches of one image
    (["student.name=mobilenetv3_small_050", "batch_size=1"],
     "student mobilenetv3_small_050 (baseline) cannot train on batches of 1 image (batch_size=1): its BatchNorm "
     "needs 2 or more: pass batch_size=2 or larger"),
    # every paradigm's other models: the second teacher, a peer, the assistant
    (["paradigm=multi_teacher", "teachers=[cifar:resnet8,cifar:vgg8]", "dataset.image_size=4",
      "student.name=cifar:resnet8"], "teacher cifar:vgg8 fails a training step"),
    (["paradigm=online", "paradigm.peers=[cifar:resnet8,cifar:vgg8]", "dataset.image_size=4"],
     "peers cifar:resnet8, cifar:vgg8 fails a training step"),
    (["paradigm=assistant", "assistant.name=cifar:vgg8", "teacher.name=cifar:resnet8", "dataset.image_size=4"],
     "assistant cifar:vgg8 fails a training step"),
    # a model option its constructor does not take
    (["student.name=mobilenetv3_small_050", "+student.kwargs.nope=2"],
     "student mobilenetv3_small_050 (baseline) cannot be built: "),
    # the loss of the distill stage
    (["T=1e-300"], "the loss of student cifar:resnet8 is not finite on its first batch, before any training "
                   "(loss_kd=nan)"),
    (["distill=fitnets", "+distill.student_layers=[nope]", "+distill.teacher_layers=[stages.1]"], "nope"),
    # values validate() refuses on the command line, reaching the preflight through a config built in code
    (["optim.momentum=-1"], "optim=sgd refuses its values (lr=0.05, optim.momentum=-1.0"),
    (["dataset.num_classes=1"], "dataset.num_classes=1 must be an integer >= 2"),
    (["batch_size=97"], "batch_size=97 is larger than the training set (96 images)"),
])
def test_what_cannot_train_fails_before_any_stage(build, overrides, expected, tmp_path):
    assert expected in preflight_error(build, *overrides)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing written


def test_a_last_batch_of_one_is_dropped_so_it_is_no_failure(build):
    from kdrun.run.preflight import smallest_batch

    ctx = build("student.name=mobilenetv3_small_050", "dataset.train_size=97", "baseline=false")
    assert smallest_batch(ctx) == 32  # 97 = 3 x 32 + 1: the one left over is dropped (engine/loaders.py)


def test_a_process_share_of_one_image_is_named(build, monkeypatch):
    """batch_size=2 over two torchrun processes: each trains on one image a step."""
    from kdrun.engine import distributed

    monkeypatch.setattr(distributed, "shard", lambda: (0, 2))
    message = preflight_error(build, "student.name=mobilenetv3_small_050", "batch_size=2")
    assert "cannot train on batches of 1 image (batch_size=2 split over 2 processes)" in message
    assert "pass batch_size=4 or larger" in message


def test_a_teacher_checkpoint_of_another_class_count_fails_before_the_first_teacher_trains(build, tmp_path):
    from kdrun.models import create_model

    path = tmp_path / "t100.pt"
    torch.save(create_model("cifar:resnet8", num_classes=100, in_chans=3).state_dict(), path)
    message = preflight_error(build, "paradigm=multi_teacher",
                              f"teachers=[cifar:resnet14,{{name: cifar:resnet8, checkpoint: '{path}'}}]")
    assert "has 100 output classes but the dataset has 10" in message


def test_a_loaded_teacher_runs_frozen_and_is_checked_too(build, tmp_path):
    from kdrun.models import create_model

    path = tmp_path / "vgg8.pt"
    torch.save(create_model("cifar:vgg8", num_classes=10, in_chans=3).state_dict(), path)
    message = preflight_error(build, "teacher.name=cifar:vgg8", f"teacher.checkpoint={path}", "dataset.image_size=4")
    assert message.startswith("teacher cifar:vgg8 fails in eval mode on a batch of 2 3x4x4 images: ")


def test_an_image_folder_of_one_class_is_refused(build, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "one" / split / "cat" / f"{i}.png")
    message = preflight_error(build, "dataset=imagefolder", f"dataset.root={tmp_path / 'one'}",
                              "dataset.image_size=8", "batch_size=2")
    assert message.startswith("dataset imagefolder has 1 class (cat): a classifier needs 2 or more")


def test_the_run_is_left_as_it_was(build, cfg_of, tmp_path):
    """Random generators restored, nothing written, the preflight's models are its own."""
    from kdrun.run.preflight import preflight

    ctx = build("distill=crd")  # crd draws its memory banks from torch's generator
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    seconds = preflight(ctx, "offline")
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert 0 < seconds < 30


def test_the_preflight_step_with_speed_switches(build):
    """bf16 autocast and channels_last: the preflight runs the step as the stages will."""
    build("precision=bf16", "channels_last=true", "device=cpu")


@pytest.mark.e2e  # trains every stage of a run, twice
@pytest.mark.slow
def test_metrics_are_the_same_with_and_without_the_preflight(cfg_of, tmp_path, monkeypatch, without_timings):
    import shutil

    from kdrun.run import pipeline

    def run():
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # each run trains its own teacher and baseline
        shutil.rmtree(tmp_path / "run", ignore_errors=True)    # into the same paths (metrics.json holds them)
        cfg = cfg_of("distill=crd", "teacher.epochs=1", "student.epochs=2")  # crd: random memory banks
        return pipeline.run_experiment(cfg, tmp_path / "run")

    with_preflight = run()
    monkeypatch.setattr(pipeline, "preflight", lambda ctx, paradigm: 0.0)
    without = run()
    assert without_timings(with_preflight) == without_timings(without)
    assert with_preflight["history"][0]["loss"] != with_preflight["history"][-1]["loss"]  # it trained


def test_a_gpu_index_that_is_not_there_is_one_line(monkeypatch):
    from kdrun.run.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KdrunError, match=r"device=cuda:2 but 2 CUDA GPU\(s\) are visible: use device=cuda:0 to "
                                         r"cuda:1 or device=auto"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
