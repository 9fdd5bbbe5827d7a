"""Stored teacher outputs (teacher.outputs / teacher.export_outputs, README "Stored teacher outputs"): the file
round trip against the live teacher, top-k renormalisation and hard-label distillation by hand, sample keys of an
image folder, and a seeded run distilled from the stored logits against the same run with the live teacher."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdrun.data import build_dataset
from kdrun.data.imagefolder import build_imagefolder
from kdrun.distill import build_loss
from kdrun.distill.context import StepContext
from kdrun.distill.hard_label import TeacherLabelTerm
from kdrun.engine.teacher_file import (as_logits, check_against, export_teacher, in_dataset_order, read_outputs,
                                       sample_keys, topk_distribution, write_outputs)
from kdrun.errors import KdrunError
from kdrun.models import create_model

TINY = {"name": "synthetic", "image_size": 8, "train_size": 48, "test_size": 16, "num_classes": 6}
KD = {"name": "kd", "terms": {"ce": {"type": "ce", "weight": 0.1}, "kd": {"type": "kd", "weight": 0.9, "T": 4.0}}}


@pytest.fixture(scope="module")
def tiny():
    data = build_dataset(TINY)
    torch.manual_seed(0)
    teacher = create_model("cifar:resnet8", num_classes=6, in_chans=3).eval()
    return data, teacher


def stored_rows(path, data, split="train"):
    stored = read_outputs(path)
    check_against(stored, data)
    part = stored.splits[split]
    return in_dataset_order(part, as_logits(part, stored.kind, data.num_classes), getattr(data, split))


def test_topk_renormalisation_by_hand():
    # K=5 classes, top-2 answer: class 3 at 0.5, class 0 at 0.3; the other 0.2 goes evenly to classes 1, 2, 4.
    full = topk_distribution(torch.tensor([[3, 0]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64), 5)
    assert full[0].tolist() == pytest.approx([0.3, 0.2 / 3, 0.2 / 3, 0.5, 0.2 / 3], abs=1e-12)
    # k = K: the answer is the whole distribution; a top-k summing to 1 leaves the others at 0.
    assert topk_distribution(torch.tensor([[1, 0]]), torch.tensor([[0.75, 0.25]]), 2)[0].tolist() == [0.25, 0.75]
    assert topk_distribution(torch.tensor([[2]]), torch.tensor([[1.0]]), 3)[0].tolist() == [0.0, 0.0, 1.0]


def test_teacher_label_term_is_cross_entropy_on_the_teachers_labels():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels = teacher.argmax(1).tolist()
    rows = student.tolist()
    by_hand = -sum(math.log(math.exp(row[c]) / sum(math.exp(v) for v in row)) for row, c in zip(rows, labels)) / 4
    ctx = StepContext(student, torch.zeros(4, dtype=torch.long), torch.arange(4), teacher)
    assert TeacherLabelTerm()(ctx).item() == pytest.approx(by_hand, rel=1e-6)
    # distill=hard with alpha=1 on a label-only stored teacher (one-hot rows) is that same cross-entropy
    hard = build_loss({"terms": {"ce": {"type": "ce", "weight": 0.0}, "teacher_label": {"type": "teacher_label"}}})
    one_hot = F.one_hot(torch.tensor(labels), 3).float()
    total, _ = hard(StepContext(student, torch.zeros(4, dtype=torch.long), torch.arange(4), one_hot))
    assert total.item() == pytest.approx(by_hand, rel=1e-6)


def test_round_trip_gives_the_live_teachers_losses(tiny, tmp_path):
    data, teacher = tiny
    paths = {kind: export_teacher(teacher, data, tmp_path / f"{kind}.npz", kind, 3, "cifar:resnet8", 8,
                                  torch.device("cpu")) for kind in ("logits", "topk", "label")}
    indices = torch.tensor([17, 3, 40, 8, 29, 0])  # a shuffled batch, as a training step sees one
    images, labels, _ = data.train.batch(indices)
    with torch.no_grad():
        live = teacher(images)
    student = torch.randn(len(indices), 6, generator=torch.Generator().manual_seed(2))
    loss = build_loss(KD)
    stored = stored_rows(paths["logits"], data)[indices]
    live_total, live_parts = loss(StepContext(student, labels, indices, live))
    stored_total, stored_parts = loss(StepContext(student, labels, indices, stored))
    assert (stored_total - live_total).abs().item() < 1e-6
    assert (stored_parts["kd"] - live_parts["kd"]).abs().item() < 1e-6
    # top-3 rows: the live teacher's three largest probabilities where they were, the rest spread evenly
    topk = stored_rows(paths["topk"], data)[indices].exp()
    probabilities = live.softmax(1)
    values, ids = probabilities.topk(3, dim=1)
    assert torch.allclose(topk.gather(1, ids), values, atol=1e-6)
    others = topk.scatter(1, ids, 0.0)
    expected_rest = ((1 - values.sum(1, keepdim=True)) / 3).expand(-1, 6)
    assert torch.allclose(others, expected_rest.scatter(1, ids, 0.0), atol=1e-6)
    # labels: the live teacher's argmax, on the test split too
    assert stored_rows(paths["label"], data)[indices].argmax(1).tolist() == live.argmax(1).tolist()
    with torch.no_grad():
        assert stored_rows(paths["label"], data, "test").argmax(1).tolist() == teacher(data.test.batch(
            torch.arange(16))[0]).argmax(1).tolist()


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_keys_are_relative_paths_in_any_row_order(tmp_path):
    for split in ("train", "val"):
        for i, name in enumerate(["cat/a.png", "cat/b.png", "dog/c.png"]):
            _png(tmp_path / "data" / split / name, 40 * i)
    data = build_imagefolder({"root": str(tmp_path / "data"), "image_size": 8, "augment": False})
    assert sample_keys(data.train).tolist() == ["cat/a.png", "cat/b.png", "dog/c.png"]
    logits = {"train": torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), "test": torch.zeros(3, 2)}
    path = write_outputs(tmp_path / "t.npz", "logits", None, data, "elsewhere", logits)
    # rows as another program might write them: reversed. Read back, row i is the dataset's sample i again.
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["train_keys"], arrays["train_logits"] = arrays["train_keys"][::-1], arrays["train_logits"][::-1]
    np.savez(path, **arrays)
    assert stored_rows(path, data).tolist() == logits["train"].tolist()
    arrays["train_keys"] = np.array(["cat/a.png", "cat/b.png", "dog/x.png"])
    np.savez(path, **arrays)
    with pytest.raises(KdrunError, match=r"key\(s\) dog/x.png of its train split match none of dataset imagefolder's "
                                         r"train files \(keys are paths relative to the split folder\)"):
        check_against(read_outputs(path), data)


def test_a_seeded_run_from_stored_logits_trains_as_with_the_live_teacher(run_kdrun, tiny_args, read_metrics,
                                                                         tmp_path):
    tiny = [*tiny_args, "epochs=1", "dataset.train_size=128", "dataset.test_size=32"]
    exported = run_kdrun([*tiny, "paradigm=teacher", "teacher.export_outputs=true", "hydra.run.dir=t"], tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    runs = {"live": ["teacher.checkpoint=t/checkpoints/last.pt"], "stored": ["teacher.outputs=t/teacher_outputs.npz"]}
    for name, args in runs.items():
        done = run_kdrun([*tiny, *args, "baseline=false", f"hydra.run.dir={name}"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    live, stored = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "stored")
    assert stored["teacher"]["source"] == "outputs" and stored["teacher"]["outputs_kind"] == "logits"
    assert stored["teacher"]["k"] is None and stored["teacher"]["name"] == "cifar:resnet14"
    for key in ("top1", "top5", "nll", "ece"):  # the teacher's test metrics, from its stored test outputs
        assert stored["teacher"][key] == pytest.approx(live["teacher"][key], abs=1e-6)
    for key in ("top1", "nll", "agreement", "kl_t1"):
        assert stored["student"][key] == pytest.approx(live["student"][key], abs=1e-4)
    assert [r["loss"] for r in stored["history"]] == pytest.approx([r["loss"] for r in live["history"]], abs=1e-5)
    assert stored["compression"] is None and live["compression"] > 1
    assert read_metrics(tmp_path / "t")["teacher_outputs"]["kind"] == "logits"
