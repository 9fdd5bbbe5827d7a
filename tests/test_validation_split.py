"""dataset.val_split: a seeded, stratified share of the training set picks the best epoch; the test split is reported."""
import pytest
import torch

from kdrun.data import build_dataset, describe, validation_set
from kdrun.data.validation import stratified_holdout


def synthetic(**extra):
    return build_dataset({"name": "synthetic", "train_size": 200, "test_size": 40, "image_size": 8, "num_classes": 4,
                          **extra})


def test_stratified_holdout_takes_the_fraction_of_each_class_with_its_seed():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5 + [3] * 1)
    train, val = stratified_holdout(labels, 0.2, seed=3)
    assert sorted(torch.bincount(labels[val], minlength=4).tolist()) == [0, 1, 2, 4]   # round(0.2 * n), <= n - 1
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 4, 1, 0]
    assert len(set(train.tolist()) | set(val.tolist())) == len(labels) and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(stratified_holdout(labels, 0.2, seed=3)[1], val)          # the same seed, the same split
    assert not torch.equal(stratified_holdout(labels, 0.2, seed=4)[1], val)      # another seed, another one


def test_val_split_holds_out_unaugmented_training_images_and_keeps_the_test_split():
    whole, split = synthetic(), synthetic(val_split=0.25, val_split_seed=1)
    assert validation_set(whole) is whole.test and whole.val is None
    held_out = [round(0.25 * n) for n in torch.bincount(whole.train.labels, minlength=4).tolist()]
    assert (len(split.train), len(split.val), len(split.test)) == (200 - sum(held_out), sum(held_out), 40)
    assert validation_set(split) is split.val and split.val.augment is None
    assert torch.equal(split.test.images, whole.test.images)
    # Every image lands in exactly one of the two parts, with its label.
    rows = {tuple(img.flatten().tolist()): int(y) for img, y in zip(whole.train.images, whole.train.labels)}
    parts = [(img, y) for part in (split.train, split.val) for img, y in zip(part.images, part.labels)]
    assert sorted(rows.values()) == sorted(int(y) for _, y in parts)
    assert all(rows[tuple(img.flatten().tolist())] == int(y) for img, y in parts)
    assert torch.bincount(split.val.labels, minlength=4).tolist() == held_out
    assert describe(split).startswith(f"synthetic: {200 - sum(held_out)} train / {sum(held_out)} validation / 40 test")


@pytest.mark.e2e
def test_best_epoch_is_chosen_on_the_held_out_split_and_its_test_accuracy_reported(run_kdrun, tiny_args, tmp_path,
                                                                                    read_metrics):
    proc = run_kdrun([*tiny_args, "epochs=3", "baseline=false", "dataset.val_split=0.25",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    history, student = metrics["history"], metrics["student"]
    assert metrics["dataset"]["val_size"] > 0 and all("test_top1" in record for record in history)
    best = max(range(len(history)), key=lambda i: (history[i]["val_top1"], -i))
    assert student["best_epoch"] == best + 1 and student["best_top1"] == history[best]["val_top1"]
    assert student["best_test_top1"] == history[best]["test_top1"]
    # The final evaluation is the last epoch's weights on the test split.
    assert student["top1"] == pytest.approx(history[-1]["test_top1"])
    assert (metrics["dataset"]["train_size"], metrics["dataset"]["val_size"]) == (240, 80)   # of 320, 8 per class
