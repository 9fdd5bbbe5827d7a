"""Several processes: Batches' shards, and a real 2-process torchrun launch (gloo on the CPU)."""
import os
import subprocess
import sys

import pytest
import torch

from kdrun.data import build_dataset
from kdrun.engine import distributed
from kdrun.engine.evaluate import predict
from kdrun.engine.loaders import Batches
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.engine.ranks import worker_argv


def data(train_size: int):
    return build_dataset({"name": "synthetic", "image_size": 8, "train_size": train_size, "test_size": 8})


@pytest.mark.parametrize(("size", "batch", "world"), [(100, 32, 2), (96, 32, 2), (101, 30, 3), (66, 32, 2)])
def test_shards_are_disjoint_and_make_up_the_single_process_batches(size, batch, world):
    train = data(size).train
    single = Batches(train, batch, torch.device("cpu"), shuffle=True, seed=3, epoch=2).batch_indices()
    shards = [Batches(train, batch, torch.device("cpu"), shuffle=True, seed=3, epoch=2, shard=(rank, world))
              for rank in range(world)]
    per_rank = [s.batch_indices() for s in shards]
    assert len({len(s) for s in shards} | {len(b) for b in per_rank}) == 1  # every process takes as many steps
    for step, whole in enumerate(single if len(single) == len(per_rank[0]) else single[:-1]):
        parts = [rank_batches[step] for rank_batches in per_rank]
        assert torch.equal(torch.cat(parts), whole)  # disjoint, and together the single-process batch
        assert min(len(p) for p in parts) >= 2      # BatchNorm needs two samples per process
    # the images a process is handed are the ones its indices name
    images, labels, indices = next(iter(shards[1]))
    assert torch.equal(indices, per_rank[1][0]) and torch.equal(labels, train.labels[indices])


def test_a_last_batch_too_small_to_split_is_dropped():
    train = data(67).train  # 67 = 2 * 32 + 3: three images cannot give 2 processes two each
    assert len(Batches(train, 32, torch.device("cpu"), shuffle=True, shard=(0, 2))) == 2
    assert len(Batches(train, 32, torch.device("cpu"), shuffle=True)) == 3  # one process keeps it
    assert len(Batches(train, 32, torch.device("cpu"), shuffle=False, shard=(0, 2))) == 3  # evaluation never drops


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    values, correct = torch.ones(3, 2), torch.tensor(5.0)
    assert distributed.reduce_epoch(values, correct, 7) == (values, correct, 7)
    assert distributed.shard() == (0, 1) and distributed.from_rank_zero("x") == "x"
    assert distributed.wrap(torch.nn.Linear(2, 2), torch.device("cpu")).__class__ is torch.nn.Linear
    distributed.check_batch_size(33)


def test_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(KdrunError, match="batch_size=66 is the global batch, split over 4 processes.*batch_size=64"):
        distributed.check_batch_size(66)
    distributed.check_batch_size(64)


def test_other_ranks_get_a_private_hydra_dir_and_no_logs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert worker_argv(["T=3", "hydra.run.dir=run"]) == ["T=3", "hydra.run.dir=run"]
    monkeypatch.setenv("RANK", "1")
    args = worker_argv(["T=3", "hydra.run.dir=run"])
    assert args[0] == "T=3" and "hydra.run.dir=run" not in args
    assert {"hydra.output_subdir=null", "hydra/job_logging=disabled"} <= set(args)
    with pytest.raises(KdrunError, match="torchrun runs one experiment at a time"):
        worker_argv(["-m", "T=1,2"])


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, tiny_args, read_metrics):
    """2 processes on the CPU: the run completes, only rank 0 writes, and metrics.json's accuracy is what
    one process measures on the saved checkpoint."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch),
           "OMP_NUM_THREADS": "1"}
    args = [a for a in tiny_args if not a.startswith("epochs")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun",
         *args, "epochs=2", "device=cpu", "teacher.cache=true", "hydra.run.dir=run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["speed"]["processes"] == 2
    assert proc.stdout.count("gain over baseline") == 1  # one result table, from rank 0
    log = (run_dir / "kdrun.log").read_text()
    assert log.count("student epoch 2/2") == 1 and log.count("teacher epoch 1/2") == 1
    # Rank 0 alone wrote: one run directory, one entry per cache stage, nothing left in rank 1's scratch dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "run", "tmp"]
    assert not list(scratch.glob("kdrun-rank*"))  # rank 1's Hydra dir is removed at exit
    cache = tmp_path / "outputs" / "cache"
    for stage in ("teacher", "baseline", "teacher_outputs"):
        assert len([p for p in (cache / stage).iterdir() if p.is_dir()]) == 1, stage
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: the training curves and the final
    # summary are two files, both written by one process (rank 0).
    event_files = list(run_dir.glob("events.out.tfevents.*"))
    assert event_files and len({f.name.split(".")[-2] for f in event_files}) == 1
    # 320 images, global batch 32: 10 steps per epoch on each process, as in one process.
    assert len(metrics["history"]) == 2 and metrics["history"][-1]["epoch"] == 2

    torch.manual_seed(0)
    student = create_model("cifar:resnet8", 10, 3)
    student.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    test = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 320, "test_size": 64}).test
    logits, labels = predict(student, test, 32, torch.device("cpu"))
    assert metrics["student"]["top1"] == (logits.argmax(1) == labels).float().mean().item()
    assert metrics["history"][-1]["val_top1"] == metrics["student"]["top1"]
