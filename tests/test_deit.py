"""distill=deit (kdrun/distill/deit.py): the distillation-token loss against the paper's Eq. 2 and 3 on fixed
float64 logits; a tiny timm VisionTransformerDistilled through kdrun's forward (class head on the labels,
distillation head on the teacher, the average of both at test time); one-line errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from kdrun.config.schema import register_configs
from kdrun.data import InMemoryDataset
from kdrun.distill import build_loss
from kdrun.distill.context import StepContext
from kdrun.distill.deit import DeiTTerm, enable_distill_token
from kdrun.engine.evaluate import predict
from kdrun.engine.forward import StepForward
from kdrun.engine.loaders import Batches
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()

CLS = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]], dtype=torch.float64)
DIST = torch.tensor([[0.2, 1.5, -0.7], [-0.4, 0.9, 0.6]], dtype=torch.float64)
TEACHER = torch.tensor([[0.5, 2.5, 0.1], [3.0, -1.0, 0.4]], dtype=torch.float64)   # argmax: 1, 0
LABELS = torch.tensor([2, 1])


def softmax(row, T=1.0):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def paper_hard() -> float:
    """Eq. 3, distillation part: CE of the distillation head against the teacher's top class, batch mean."""
    rows = DIST.tolist()
    tops = [max(range(3), key=lambda c: TEACHER[i, c].item()) for i in range(2)]
    return sum(-math.log(softmax(rows[i])[tops[i]]) for i in range(2)) / 2


def paper_soft(T: float, per_element: bool) -> float:
    """Eq. 2, distillation part: T^2 KL(psi(Z_t/T) || psi(Z_d/T)), summed, over B*K (authors) or B."""
    total = 0.0
    for s_row, t_row in zip(DIST.tolist(), TEACHER.tolist()):
        p_s, p_t = softmax(s_row, T), softmax(t_row, T)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return T * T * total / (6 if per_element else 2)


def ctx() -> StepContext:
    return StepContext(CLS, LABELS, torch.arange(2), TEACHER, student_distill_logits=DIST)


@pytest.mark.parametrize(("options", "expected"), [
    ({"mode": "hard"}, paper_hard()),
    ({"mode": "soft", "T": 1.0}, paper_soft(1.0, True)),
    ({"mode": "soft", "T": 3.0}, paper_soft(3.0, True)),
    ({"mode": "soft", "T": 3.0, "reduction": "batch"}, paper_soft(3.0, False)),
])
def test_deit_term_matches_the_paper(options, expected):
    assert DeiTTerm(**options)(ctx()).item() == pytest.approx(expected, rel=0, abs=1e-14)


def test_the_method_file_is_half_labels_half_teacher_and_zero_kl_when_the_head_copies_the_teacher():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["distill=deit"])
    loss = build_loss(dict(cfg.distill))
    total, parts = loss(ctx())
    ce = sum(-math.log(softmax(CLS[i].tolist())[LABELS[i]]) for i in range(2)) / 2   # the class head on labels
    assert total.item() == pytest.approx(0.5 * ce + 0.5 * paper_hard(), abs=1e-14)
    assert set(parts) == {"ce", "deit"}
    copy = StepContext(CLS, LABELS, torch.arange(2), TEACHER, student_distill_logits=TEACHER.clone())
    assert DeiTTerm(mode="soft", T=2.0)(copy).item() == pytest.approx(0.0, abs=1e-15)


def tiny_distilled_vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, embed_dim=24, num_heads=2,
                             num_classes=3)


def test_a_distilled_vit_trains_its_heads_on_labels_and_teacher_and_predicts_their_average():
    model, teacher = tiny_distilled_vit(), torch.nn.Linear(3 * 32 * 32, 3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    enable_distill_token(model)
    forward = StepForward(model, lambda x: teacher(x.flatten(1)))
    model.train()
    step = forward(images, labels, torch.arange(4), 0)
    assert step.student_distill_logits is not None and step.student_distill_logits.shape == (4, 3)
    loss = build_loss({"terms": {"ce": {"type": "ce", "weight": 0.5}, "deit": {"type": "deit", "weight": 0.5}}})
    total, _ = loss(step)
    total.backward()
    # the class head learns from the labels' CE alone, the distillation head from the teacher's labels alone
    features = model.forward_features(images)
    head_ce = torch.autograd.grad(0.5 * F.cross_entropy(model.head(features[:, 0]), labels), model.head.weight)[0]
    teacher_labels = teacher(images.flatten(1)).argmax(1)
    head_kd = torch.autograd.grad(0.5 * F.cross_entropy(model.head_dist(features[:, 1]), teacher_labels),
                                  model.head_dist.weight)[0]
    torch.testing.assert_close(model.head.weight.grad, head_ce)
    torch.testing.assert_close(model.head_dist.weight.grad, head_kd)
    # evaluation: one prediction, the average of both heads
    dataset = InMemoryDataset(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), labels, [0.5] * 3, [0.5] * 3)
    logits, _ = predict(model, dataset, 4, torch.device("cpu"))
    images, _, _ = next(iter(Batches(dataset, 4, torch.device("cpu"))))
    with torch.no_grad():
        features = model.eval().forward_features(images)
        average = (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2
    torch.testing.assert_close(logits, average)
    assert model.training is False


def test_deit_refuses_a_student_without_a_distillation_token_and_bad_options():
    plain_vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=24, num_heads=2,
                                  num_classes=3)
    with pytest.raises(KdrunError, match=r"^distill=deit needs a student with a distillation token and this one "
                                         r"\(VisionTransformer\) has none: use a timm \*_distilled_\* model") as raised:
        enable_distill_token(plain_vit)
    assert "\n" not in str(raised.value)
    one_head = StepContext(CLS, LABELS, torch.arange(2), TEACHER)   # e.g. a paradigm that never turned the token on
    with pytest.raises(KdrunError, match="distill=deit: the student returned one head, not its class and distillation"):
        DeiTTerm()(one_head)
    with pytest.raises(KdrunError, match="distill.terms.deit.mode=medium must be hard or soft"):
        DeiTTerm(mode="medium")
    with pytest.raises(KdrunError, match="distill.terms.deit.T=0.0 must be > 0"):
        DeiTTerm(mode="soft", T=0.0)


def logit_methods() -> list[str]:
    """The shipped methods whose every term reads logits only (the response family), presets (_ls) aside."""
    import yaml

    from kdrun.distill import TERMS
    from kdrun.paths import group_options

    methods = []
    for name in group_options("distill"):
        terms = yaml.safe_load((conf_dir() / "distill" / f"{name}.yaml").read_text())["terms"]
        families = {TERMS.info(str(spec.get("type", term)))["family"] for term, spec in terms.items()}
        if not name.endswith("_ls") and families == {"response"}:
            methods.append(name)
    return methods


def test_logit_methods_and_deit_train_a_tiny_vit_student_through_the_cli(run_kdrun, read_metrics, tmp_path):
    """One sweep: every logit method with a distilled ViT student (its two heads averaged, as timm trains it
    without distill=deit), and deit with its heads apart."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    methods = logit_methods()
    assert {"deit", "kd", "dkd", "mlkd"} <= set(methods)
    proc = run_kdrun(["-m", f"distill={','.join(methods)}", "teacher.name=cifar:resnet8",
                      "student.name=deit_tiny_distilled_patch16_224", "+student.kwargs.depth=1",
                      "+student.kwargs.embed_dim=48", "dataset=synthetic", "dataset.image_size=32",
                      "dataset.train_size=64", "dataset.test_size=32", "epochs=1", "batch_size=32", "baseline=false",
                      "progress=false", "tb_figures=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {read_metrics(d)["method"]: d for d in (tmp_path / "sweep").iterdir() if (d / "metrics.json").is_file()}
    assert sorted(jobs) == sorted(methods)
    for method, job in jobs.items():
        metrics = read_metrics(job)
        assert metrics["status"] == "completed", method
        # the final evaluation (eval mode: the heads' average) is what the epoch's validation measured
        assert metrics["student"]["top1"] == pytest.approx(metrics["history"][-1]["val_top1"]), method
    tags = set(EventAccumulator(str(jobs["deit"])).Reload().Tags()["scalars"])
    assert {"train/loss_ce", "train/loss_deit"} <= tags
