"""Torn checkpoints and cache entries, and locks of dead processes: each is recovered from."""
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from filelock import Timeout

from kdrun.engine.cache import CacheEntry
from kdrun.engine.last_checkpoint import load_last, save_last
from kdrun.errors import KdrunError

META = {"model_name": "cifar:resnet8", "num_classes": 10, "in_chans": 3}


def _state(epoch: int) -> dict:
    return {"format": "kdrun-checkpoint", "version": 1, **META, "model": {"w": torch.full((3,), float(epoch))},
            "loss": {}, "optimizer": {}, "scheduler": {}, "epoch": epoch, "history": [], "best_top1": 0.5,
            "best_epoch": epoch, "rng": {}}


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_each_save_keeps_the_one_before(tmp_path):
    for epoch in (1, 2, 3):
        save_last(_state(epoch), tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temporaries left
    state, path = load_last(tmp_path, "student", META)
    assert state["epoch"] == 3 and path == tmp_path / "last.pt"


def test_torn_last_falls_back_to_the_previous_one(tmp_path, caplog):
    save_last(_state(1), tmp_path)
    save_last(_state(2), tmp_path)
    _truncate(tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        state, path = load_last(tmp_path, "student", META)
    assert state["epoch"] == 1 and path == tmp_path / "last.prev.pt"
    warning = caplog.records[-1].getMessage()
    assert warning.startswith(f"student: {tmp_path / 'last.pt'} is unreadable (") and "\n" not in warning
    # Moved aside: the next save must not rotate the broken file over the good one.
    assert (tmp_path / "last.pt.corrupt").is_file() and not (tmp_path / "last.pt").exists()
    save_last(_state(2), tmp_path)
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["epoch"] == 1


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    save_last(_state(1), tmp_path)
    save_last(_state(2), tmp_path)
    _truncate(tmp_path / "last.pt")
    (tmp_path / "last.prev.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(KdrunError, match=r"student: cannot resume from .*: last.pt and last.prev.pt are unreadable"):
        load_last(tmp_path, "student", META)


def test_checkpoint_of_another_kind_is_not_taken_for_a_resumable_one(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "last.pt")  # a plain state dict
    with pytest.raises(KdrunError, match="last.pt is unreadable"):
        load_last(tmp_path, "student", META)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save_last(_state(1), tmp_path)
    with pytest.raises(KdrunError, match=r"was written for model_name='cifar:resnet8' but this run has "
                                         r"model_name='cifar:resnet20'"):
        load_last(tmp_path, "student", {**META, "model_name": "cifar:resnet20"})


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.pt.tmp{dead.pid}"
    own = tmp_path / f".last.pt.tmp{os.getpid()}"
    stale.write_bytes(b"half")
    own.write_bytes(b"mine")
    assert load_last(tmp_path, "student", META) is None
    assert not stale.exists() and own.exists()


def test_cache_entry_is_complete_only_with_a_whole_model_file(tmp_path):
    entry = CacheEntry(tmp_path, "teacher", "abc")
    assert not entry.complete()
    entry.start_build({"stage": "teacher"})
    save_last(_state(1), entry.build_directory)  # an unfinished build: progress, no entry yet
    assert not entry.complete() and not entry.directory.exists()
    torch.save({"model": {"w": torch.zeros(100)}}, entry.build_directory / "model.pt")
    entry.finish_build({"stage": "teacher"}, keep_best=False)
    assert entry.complete()
    _truncate(entry.model_path, keep=0.9)
    assert not entry.complete()  # rebuilt by the caller
    assert (tmp_path / "teacher" / "abc.corrupt" / "model.pt").is_file() and not entry.directory.exists()
    assert not list((tmp_path / "teacher").glob("**/.*tmp*"))


HOLD_LOCK = """
import sys, time
from pathlib import Path
from kdrun.engine.cache import CacheEntry
lock = CacheEntry(Path(sys.argv[1]), "teacher", "abc").lock()
lock.acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_lock_of_a_killed_builder_is_taken_over_at_once(tmp_path):
    """filelock's flock() lock dies with its process: a SIGKILLed builder leaves no stale lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = CacheEntry(tmp_path, "teacher", "abc").lock()
        with pytest.raises(Timeout):
            lock.acquire(timeout=0.2)  # held while the builder lives
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (tmp_path / "teacher" / "abc.lock").exists()  # the file stays; the lock does not
        lock.acquire(timeout=30)
        assert lock.is_locked
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
