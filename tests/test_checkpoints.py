"""Checkpoints and caches: every file kdrun writes loads under weights_only=True (as a teacher or as the
student's initial weights), and cache entries are verified by sha256, hold only what reuse needs, and
resume an interrupted build."""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from kdrun.config.schema import register_configs
from kdrun.data import build_dataset
from kdrun.distill import hard_label_loss
from kdrun.engine.cache import CacheEntry, file_sha256, stage_key
from kdrun.engine.checkpoint import load_model_weights, save_model
from kdrun.engine.forward import StepForward
from kdrun.engine.last_checkpoint import load_last
from kdrun.engine.speed import Speed
from kdrun.engine.teacher_cache import cache_spec, load_or_build
from kdrun.engine.trainer import Recipe, Stage, _rng_state, _set_rng_state, train
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.paths import conf_dir
from kdrun.stages.context import RunContext
from kdrun.stages.roles import hard_label_role, train_role

register_configs()
SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
TINY = ["dataset=synthetic", "dataset.image_size=16", "dataset.train_size=64", "dataset.test_size=32",
        "teacher.name=cifar:resnet14", "student.name=cifar:resnet8", "epochs=1", "batch_size=32", "optim=sgd",
        "lr=0.05", "progress=false", "tb_figures=0"]


def compose_tiny(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])


def context(tmp_path: Path, *overrides: str) -> RunContext:
    cfg = compose_tiny(tmp_path, *overrides)
    return RunContext(cfg, build_dataset(cfg.dataset), torch.device("cpu"), tmp_path / "run", progress=False)


def flip_middle(path: Path, size: int = 4096) -> None:
    """Invert `size` bytes in the middle of the file: a whole file (a valid zip) with wrong contents."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start:start + size] = bytes(b ^ 0xFF for b in data[start:start + size])
    path.write_bytes(bytes(data))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- weights-only loading --------------------------------------------------------------------------

def test_last_and_best_load_weights_only_and_as_a_teacher(tmp_path):
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 96, "test_size": 32})
    model = create_model("cifar:resnet8", 10, 3)
    stage = Stage("teacher", Recipe(1, 0.05, 32, SGD, {"name": "cosine"}, 0), torch.device("cpu"), tmp_path,
                  {"model_name": "cifar:resnet8", "num_classes": 10, "in_chans": 3, "dataset": "synthetic"})
    train(stage, StepForward(model), hard_label_loss(), data.train, data.test)
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)  # torch's own check, no allow-list
        assert saved["model_name"] == "cifar:resnet8" and saved["epoch"] == 1
        loaded = create_model("cifar:resnet8", 10, 3)
        meta = load_model_weights(loaded, tmp_path / name, "teacher.checkpoint", "cifar:resnet8", 10)
        assert meta["stage"] == "teacher" and same_weights(loaded.state_dict(), model.state_dict())
    assert isinstance(torch.load(tmp_path / "last.pt", weights_only=True)["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    drawn = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1])
    assert drawn[2:] == expected[2:]


def _earlier_last_checkpoint(model) -> dict:
    """last.pt as kdrun wrote it before RNG states were stored as tensors: numpy's state a tuple with an array."""
    np.random.seed(5)
    return {"format": "kdrun-checkpoint", "version": 1, "model_name": "cifar:resnet8", "num_classes": 10,
            "in_chans": 3, "dataset": "synthetic", "stage": "student", "model": model.state_dict(), "loss": {},
            "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [], "best_top1": 0.1, "best_epoch": 1,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}}


def test_checkpoint_of_an_earlier_kdrun_still_loads_and_resumes(tmp_path):
    model = create_model("cifar:resnet8", 10, 3)
    torch.save(_earlier_last_checkpoint(model), tmp_path / "last.pt")
    with pytest.raises(Exception):  # what the issue hit: numpy arrays refused by a plain weights-only load
        torch.load(tmp_path / "last.pt", weights_only=True)
    loaded = create_model("cifar:resnet8", 10, 3)
    load_model_weights(loaded, tmp_path / "last.pt", "teacher.checkpoint", "cifar:resnet8", 10)
    assert same_weights(loaded.state_dict(), model.state_dict())
    state, path = load_last(tmp_path, "student", {"model_name": "cifar:resnet8"})
    expected = np.random.rand(2)  # numpy was seeded with 5 right before the state was taken
    np.random.seed(0)
    _set_rng_state(state["rng"])
    assert path == tmp_path / "last.pt" and np.array_equal(np.random.rand(2), expected)


def test_an_online_runs_last_checkpoint_points_at_a_peer(tmp_path):
    peers = create_model("cifar:resnet8", 10, 3)
    save_model(tmp_path / "last.pt", peers, {"model_name": "peers:cifar:resnet8,cifar:resnet8", "num_classes": 10,
                                             "in_chans": 3}, "peers")
    with pytest.raises(KdrunError, match=r"holds all the peers of an online run; pass one peer's own checkpoint, "
                                         r"e\.g\. .*/peer0\.pt") as raised:
        load_model_weights(create_model("cifar:resnet8", 10, 3), tmp_path / "last.pt", "teacher.checkpoint",
                           "cifar:resnet8", 10)
    assert "\n" not in str(raised.value)


# --- student.checkpoint ----------------------------------------------------------------------------

def test_student_checkpoint_initialises_the_student_and_keys_the_baseline_by_content(tmp_path):
    torch.manual_seed(11)
    saved = create_model("cifar:resnet8", 10, 3)
    torch.save(saved.state_dict(), tmp_path / "init.pt")
    (tmp_path / "copy").mkdir()
    torch.save(saved.state_dict(), tmp_path / "copy" / "init.pt")
    torch.save(create_model("cifar:resnet8", 10, 3).state_dict(), tmp_path / "other.pt")

    ctx = context(tmp_path, f"student.checkpoint={tmp_path / 'init.pt'}")
    assert same_weights(ctx.build_model("student").state_dict(), saved.state_dict())
    role = hard_label_role(ctx, "baseline", "student")
    assert same_weights(role.forward.student.state_dict(), saved.state_dict())
    assert role.cache_spec["model"]["checkpoint_sha256"] == file_sha256(tmp_path / "init.pt")

    def key(*overrides):
        return stage_key(hard_label_role(context(tmp_path, *overrides), "baseline", "student").cache_spec)

    plain_key = key()
    assert "checkpoint_sha256" not in hard_label_role(context(tmp_path), "baseline", "student").cache_spec["model"]
    assert key(f"student.checkpoint={tmp_path / 'copy' / 'init.pt'}") == stage_key(role.cache_spec)  # content
    assert len({plain_key, stage_key(role.cache_spec), key(f"student.checkpoint={tmp_path / 'other.pt'}")}) == 3


def test_student_checkpoint_of_another_model_is_one_line(tmp_path):
    torch.save(create_model("cifar:resnet14", 10, 3).state_dict(), tmp_path / "resnet14.pt")
    ctx = context(tmp_path, f"student.checkpoint={tmp_path / 'resnet14.pt'}")
    with pytest.raises(KdrunError, match=r"^student\.checkpoint=.*resnet14\.pt does not fit 'cifar:resnet8'"):
        ctx.build_model("student")


def test_online_refuses_a_student_checkpoint(tmp_path):
    from kdrun.run.pipeline import run_experiment

    torch.save(create_model("cifar:resnet8", 10, 3).state_dict(), tmp_path / "init.pt")
    cfg = compose_tiny(tmp_path, "paradigm=online", f"student.checkpoint={tmp_path / 'init.pt'}")
    with pytest.raises(KdrunError, match=r"student\.checkpoint=.* is not read by paradigm=online: its peers must "
                                         r"start from different random weights; drop student\.checkpoint"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


# --- the stage cache -------------------------------------------------------------------------------

def entry_files(entry: CacheEntry) -> set[str]:
    return {p.name for p in entry.directory.iterdir()}


def build_teacher(ctx: RunContext):
    """The teacher stage through the cache (the tests build it as a ResNet-8: only the cache is tested)."""
    role = hard_label_role(ctx, "teacher", "teacher")
    return role, CacheEntry(ctx.cache_root, "teacher", stage_key(role.cache_spec)), train_role(ctx, role)


def test_an_entry_holds_what_reuse_needs_with_checksums(tmp_path):
    ctx = context(tmp_path, "epochs=2", "teacher.name=cifar:resnet8")
    _, entry, outcome = build_teacher(ctx)
    best_is_last = outcome.result.best_epoch == 2
    assert entry_files(entry) == {"model.pt", "spec.json", "tb"} | (set() if best_is_last else {"best.pt"})
    spec = json.loads((entry.directory / "spec.json").read_text())
    assert spec["sha256"] == {name: file_sha256(entry.directory / name) for name in entry_files(entry) - {"spec.json", "tb"}}
    assert spec["stage"] == "teacher" and spec["recipe"]["epochs"] == 2
    saved = torch.load(entry.model_path, weights_only=True)
    assert saved["history"] == outcome.result.history and "optimizer" not in saved
    assert not entry.build_directory.exists()
    # Reused as it is, without training.
    again = train_role(ctx, hard_label_role(ctx, "teacher", "teacher"))
    assert again.source == "cache" and same_weights(again.model.state_dict(), outcome.model.state_dict())


def test_best_is_kept_only_when_it_is_not_the_last_epoch(tmp_path):
    entry = CacheEntry(tmp_path, "baseline", "k")
    for keep_best in (False, True):
        entry.start_build({"stage": "baseline"})
        for name in ("model.pt", "best.pt", "last.pt", "last.prev.pt"):
            torch.save({"w": torch.full((4,), float(len(name)))}, entry.build_directory / name)
        entry.finish_build({"stage": "baseline"}, keep_best=keep_best)
        assert entry_files(entry) == {"model.pt", "spec.json"} | ({"best.pt"} if keep_best else set())
        assert entry.complete()
        if not keep_best:
            entry.directory.rename(tmp_path / "first")


def test_a_flipped_model_is_rebuilt_with_one_warning_to_the_same_weights(tmp_path, caplog):
    ctx = context(tmp_path, "teacher.name=cifar:resnet8")
    _, entry, first = build_teacher(ctx)
    flip_middle(entry.model_path)
    assert zipfile_whole(entry.model_path)  # not torn: only a checksum can tell
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        _, _, rebuilt = build_teacher(ctx)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0] == (f"teacher cache: {entry.directory} failed verification (model.pt does not match its "
                           f"recorded sha256); moved it to {entry.key}.corrupt and rebuilding the stage")
    assert rebuilt.source == "trained" and same_weights(rebuilt.model.state_dict(), first.model.state_dict())
    assert entry.complete() and (entry.directory.parent / f"{entry.key}.corrupt" / "model.pt").is_file()


def zipfile_whole(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


@pytest.mark.parametrize("damage", ["no checksums", "best.pt missing", "spec unreadable"])
def test_an_entry_that_cannot_be_verified_is_rebuilt(tmp_path, damage, caplog):
    entry = CacheEntry(tmp_path, "teacher", "k")
    entry.start_build({"stage": "teacher"})
    for name in ("model.pt", "best.pt"):
        torch.save({"w": torch.zeros(4)}, entry.build_directory / name)
    entry.finish_build({"stage": "teacher"}, keep_best=True)
    spec = entry.directory / "spec.json"
    if damage == "no checksums":  # an entry of an earlier kdrun
        spec.write_text(json.dumps({"stage": "teacher"}))
    elif damage == "best.pt missing":
        (entry.directory / "best.pt").unlink()
    else:
        spec.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert not entry.complete()
    reason = {"no checksums": "no checksums recorded (written by an earlier kdrun)",
              "best.pt missing": "best.pt is missing", "spec unreadable": "no checksums recorded"}[damage]
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()
    assert not entry.directory.exists() and (tmp_path / "teacher" / "k.corrupt").is_dir()


class Interrupt(Exception):
    """Stands for a kill between two epochs."""


def interrupted_teacher_build(tmp_path):
    """A 2-epoch teacher stage stopped after its first epoch: its run context and cache entry."""
    ctx = context(tmp_path, "epochs=2", "teacher.name=cifar:resnet8")
    role = hard_label_role(ctx, "teacher", "teacher")
    entry = CacheEntry(ctx.cache_root, "teacher", stage_key(role.cache_spec))

    def stop_after_the_first_epoch(epoch, record):
        raise Interrupt

    role.on_epoch = stop_after_the_first_epoch
    with pytest.raises(Interrupt):
        train_role(ctx, role)
    return ctx, entry


def test_an_interrupted_build_resumes_from_its_partial_directory(tmp_path, caplog):
    ctx, entry = interrupted_teacher_build(tmp_path)
    assert not entry.directory.exists()  # no entry without its model
    assert {p.name for p in entry.build_directory.iterdir()} >= {"last.pt", "spec.json"}
    with caplog.at_level(logging.INFO, logger="kdrun"):
        outcome = train_role(ctx, hard_label_role(ctx, "teacher", "teacher"))
    assert f"teacher: resuming from {entry.build_directory / 'last.pt'} (epoch 1/2 done)" in caplog.text
    assert outcome.source == "trained" and [h["epoch"] for h in outcome.result.history] == [1, 2]
    assert entry.complete() and not entry.build_directory.exists() and "last.pt" not in entry_files(entry)


def test_an_unfinished_build_of_an_earlier_kdrun_is_resumed(tmp_path, caplog):
    """Earlier versions trained in <key>/ itself: progress without model.pt there becomes the build directory."""
    ctx, entry = interrupted_teacher_build(tmp_path)
    entry.build_directory.rename(entry.directory)
    with caplog.at_level(logging.INFO, logger="kdrun"):
        outcome = train_role(ctx, hard_label_role(ctx, "teacher", "teacher"))
    assert f"resuming from {entry.build_directory / 'last.pt'} (epoch 1/2 done)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert outcome.source == "trained" and entry.complete()


def test_a_build_that_fails_before_any_epoch_leaves_nothing(tmp_path):
    ctx = context(tmp_path, "batch_size=1000")
    with pytest.raises(KdrunError, match="batch_size=1000 is larger than the training set"):
        build_teacher(ctx)
    assert [p.name for p in (tmp_path / "cache" / "teacher").iterdir() if not p.name.endswith(".lock")] == []


# --- the teacher-output cache ----------------------------------------------------------------------

def test_teacher_outputs_are_verified_on_reuse(tmp_path, caplog):
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 96, "test_size": 32})
    torch.manual_seed(7)
    teacher = create_model("cifar:resnet14", 10, 3)
    spec = cache_spec("cifar:resnet14", teacher, {"name": "synthetic"}, data.train, None, Speed())

    def outputs():
        return load_or_build(tmp_path, spec, teacher, None, data.train, 32, torch.device("cpu"), Speed(), 4096)

    first = outputs()
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert manifest["sha256"] == {"logits.npy": file_sha256(first.directory / "logits.npy")}
    expected = first.logits.clone()
    assert outputs().reused
    flip_middle(first.directory / "logits.npy", size=64)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        again = outputs()
    assert not again.reused and torch.equal(again.logits, expected)
    assert len(caplog.records) == 1
    assert "(logits.npy does not match its recorded sha256); moved it to" in caplog.records[0].getMessage()


# --- every kind of checkpoint a run writes ---------------------------------------------------------

@pytest.mark.slow
def test_every_checkpoint_kdrun_writes_loads_as_a_teacher_or_student(tmp_path):
    """Real runs of the paradigms that write checkpoints of their own kind, in one stage cache: each .pt file
    loads with torch's weights-only unpickler and with kdrun's loader into the model it names."""
    from kdrun.run.pipeline import run_experiment

    runs = {"offline": [], "teacher": ["paradigm=teacher", "teacher.epochs=2"],
            "online": ["paradigm=online"], "self": ["paradigm=self", "paradigm.generations=2"],
            "assistant": ["paradigm=assistant", "assistant.name=cifar:resnet8", "baseline=false"]}
    for name, overrides in runs.items():
        run_experiment(compose_tiny(tmp_path, *overrides), tmp_path / "runs" / name)
    files = sorted((tmp_path / "runs").rglob("*.pt")) + sorted((tmp_path / "cache").rglob("*.pt"))
    written = {str(p.relative_to(tmp_path)) for p in files}
    assert {"runs/offline/checkpoints/last.pt", "runs/offline/checkpoints/best.pt", "runs/online/checkpoints/peer1.pt",
            "runs/self/gen1/checkpoints/last.pt", "runs/assistant/assistant/checkpoints/best.pt",
            "runs/teacher/checkpoints/best.pt"} <= written
    assert len([p for p in files if p.name == "model.pt"]) == 3  # teacher (1 and 2 epochs), baseline
    for path in files:
        saved = torch.load(path, weights_only=True)
        name = saved["model_name"]
        if name.startswith("peers:"):  # the online run's whole cohort, for resuming
            model = create_model("cifar:resnet8", 10, 3)
            with pytest.raises(KdrunError, match="pass one peer's own checkpoint"):
                load_model_weights(model, path, "teacher.checkpoint", name, 10)
            continue
        model = create_model(name, 10, 3)
        for option in ("teacher.checkpoint", "student.checkpoint"):
            load_model_weights(model, path, option, name, 10)
        assert same_weights(model.state_dict(), saved["model"]), path


def test_a_runs_own_checkpoints_load_from_the_command_line(kdrun, tmp_path, tiny_args, read_metrics):
    """The issue's case: teacher.checkpoint=RUN/checkpoints/last.pt of an ordinary run; and student.checkpoint
    starting both the baseline and the distilled student (at a learning rate too small to move them)."""
    args = [a for a in tiny_args if not a.startswith("epochs")] + ["epochs=1"]
    first = kdrun(*args, "hydra.run.dir=first")
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "first" / "checkpoints"
    second = kdrun(*args, f"teacher.checkpoint={saved / 'last.pt'}", "teacher.name=cifar:resnet8",
                   f"student.checkpoint={saved / 'best.pt'}", "student.lr=1e-12", "hydra.run.dir=second")
    assert second.returncode == 0, second.stderr
    metrics = read_metrics(tmp_path / "second")
    assert metrics["teacher"]["source"] == "checkpoint" and metrics["baseline"]["source"] == "trained"
    assert second.stderr.count(f"student: cifar:resnet8 starts from the weights in {saved / 'best.pt'}") == 2
    start = torch.load(saved / "best.pt", weights_only=True)["model"]
    for trained in (tmp_path / "second" / "checkpoints" / "last.pt", Path(metrics["baseline"]["path"])):
        weights = torch.load(trained if trained.is_absolute() else tmp_path / trained, weights_only=True)["model"]
        convolutions = [k for k, v in start.items() if v.dim() == 4]
        assert all(torch.allclose(weights[k], start[k], atol=1e-6) for k in convolutions), trained
