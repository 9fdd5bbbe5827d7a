"""KD++/DKD++ (the ND term) and SDD against reference formulas written from their papers (float64, plain
Python), the head split they read (kdrun.models.head) and the teacher's class means."""
import math

import pytest
import torch
from torch import nn

from kdrun.distill import FeatureShapes, StepContext, build_loss
from kdrun.distill.nd import NDTerm
from kdrun.distill.response import KDTerm
from kdrun.distill.sdd import SDDTerm
from kdrun.engine.head_forward import teacher_class_means
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.models.head import build_head_split
from test_response_losses import dot, kl, softmax  # the same plain-Python references

TARGETS = [0, 2, 1]


# --- ND (Wang et al., ECCV 2024) -------------------------------------------------------------------------

def norm(v):
    return math.sqrt(dot(v, v))


def nd_reference(student, teacher, centers, targets):
    """L_ND = mean_i [1 - <s_i, c_y / ||c_y||> / max(||s_i||, ||t_i||)] (the paper's ND loss)."""
    total = 0.0
    for s, t, y in zip(student, teacher, targets):
        c = centers[y]
        total += 1 - dot(s, [x / norm(c) for x in c]) / max(norm(s), norm(t))
    return total / len(student)


STUDENT_EMB = [[1.0, -2.0, 0.5, 3.0], [0.2, 0.1, -1.5, 0.7], [2.0, 2.0, 0.0, -1.0]]
TEACHER_EMB = [[0.5, -1.0, 4.0, 1.0], [3.0, 0.0, -2.0, 0.5], [0.1, 0.3, 0.2, -0.1]]
CENTERS = [[1.0, 0.0, 2.0, -1.0], [0.5, 1.5, 0.0, 0.0], [-1.0, 0.5, 0.5, 2.0]]


def nd_term(student_dim=4, centers=CENTERS):
    term = NDTerm(FeatureShapes(student_dim=student_dim, teacher_dim=4, num_classes=3)).double()
    term.set_class_means(torch.tensor(centers, dtype=torch.float64))
    return term


def embedding_context(student, teacher=TEACHER_EMB):
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    return StepContext(torch.zeros(3, 3, dtype=torch.float64), torch.tensor(TARGETS), torch.arange(3),
                       torch.zeros(3, 3, dtype=torch.float64), student_embedding=s,
                       teacher_embedding=torch.tensor(teacher, dtype=torch.float64))


def test_nd_matches_the_papers_loss_and_pushes_the_norm_up():
    ctx = embedding_context(STUDENT_EMB)
    loss = nd_term()(ctx)
    assert loss.item() == pytest.approx(nd_reference(STUDENT_EMB, TEACHER_EMB, CENTERS, TARGETS), abs=1e-12)
    loss.backward()
    # Sample 2's student norm (3) is the larger one: its gradient keeps pushing along its class direction.
    assert dot(ctx.student_embedding.grad[2].tolist(), CENTERS[1]) < 0


def test_nd_is_zero_for_a_student_on_its_class_direction_with_at_least_the_teachers_norm():
    student = [[2 * norm(t) * x / norm(CENTERS[y]) for x in CENTERS[y]] for t, y in zip(TEACHER_EMB, TARGETS)]
    assert nd_term()(embedding_context(student)).item() == pytest.approx(0.0, abs=1e-12)


def test_nd_projects_a_narrower_student_and_skips_a_class_without_center():
    assert nd_term().projector is None
    term = nd_term(student_dim=3, centers=[CENTERS[0], [0.0] * 4, CENTERS[2]])
    assert [type(m) for m in term.projector] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert term.projector[2].in_features == 3 and term.projector[2].out_features == 4
    term.eval()  # BatchNorm at its initial statistics, no dropout: the projector is the Linear layer alone
    student = [row[:3] for row in STUDENT_EMB]
    ctx = embedding_context(student)
    projected = term.projector(ctx.student_embedding).tolist()
    centers = [CENTERS[0], [1.0, 0.0, 0.0, 0.0], CENTERS[2]]
    expected = nd_reference(projected, TEACHER_EMB, centers, TARGETS)
    expected += (1 - (1 - dot(projected[2], [x / norm(centers[1]) for x in centers[1]])
                      / max(norm(projected[2]), norm(TEACHER_EMB[2])))) / 3  # sample 2 (class 1) counts as 1
    assert term(ctx).item() == pytest.approx(expected, abs=1e-9)


def test_nd_refuses_bad_settings():
    with pytest.raises(KdrunError, match="projector_dropout"):
        NDTerm(FeatureShapes(student_dim=4, teacher_dim=4, num_classes=3), projector_dropout=1.0)
    with pytest.raises(KdrunError, match="class means have shape"):
        nd_term().set_class_means(torch.zeros(5, 4))


def test_kdpp_warms_its_kd_term_up_from_epoch_zero():
    logits = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    plain = KDTerm(T=4)(StepContext(logits[0], torch.tensor([0]), torch.arange(1), logits[1]))
    warmed = KDTerm(T=4, warmup_epochs=20, warmup_offset=0)
    at = [warmed(StepContext(logits[0], torch.tensor([0]), torch.arange(1), logits[1], epoch=e)).item()
          for e in (0, 5, 25)]
    assert at == pytest.approx([0.0, plain.item() / 4, plain.item()])


# --- SDD (Wei, Luo & Luo, CVPR 2024) ----------------------------------------------------------------------

def regions(fmap, scales):
    """Average of each cell of an s x s grid over a square map (list C x H x W), row-major, scale by scale."""
    size, out = len(fmap[0]), []
    for s in scales:
        step = size // s
        for gy in range(s):
            for gx in range(s):
                cells = [(y, x) for y in range(gy * step, (gy + 1) * step) for x in range(gx * step, (gx + 1) * step)]
                out.append([sum(channel[y][x] for y, x in cells) / len(cells) for channel in fmap])
    return out


def linear(weight, bias, v):
    return [dot(row, v) + b for row, b in zip(weight, bias)]


def dkd_region(s, t, y, T, alpha, beta):
    """alpha * TCKD + beta * NCKD, each times T^2 (Zhao et al. 2022)."""
    p_s, p_t = softmax(s, T), softmax(t, T)
    tckd = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    others = [i for i in range(len(s)) if i != y]
    nckd = kl(softmax([t[i] for i in others], T), softmax([s[i] for i in others], T))
    return T * T * (alpha * tckd + beta * nckd)


def sdd_reference(s_maps, t_maps, s_head, t_head, targets, scales, T, base, alpha=1.0, beta=8.0, comp=2.0):
    """L_SDD = (sum over consistent regions + comp * sum over complementary ones) / (regions * batch): a region
    is complementary when the teacher is right there but wrong globally (1 x 1) or the other way round."""
    total, count, complementary = 0.0, 0, 0
    for s_map, t_map, y in zip(s_maps, t_maps, targets):
        s_logits = [linear(*s_head, v) for v in regions(s_map, scales)]
        t_logits = [linear(*t_head, v) for v in regions(t_map, scales)]
        right = [max(range(len(t)), key=t.__getitem__) == y for t in t_logits]
        for s, t, r in zip(s_logits, t_logits, right):
            if base == "kd":
                loss = T * T * kl(softmax(t, T), softmax(s, T))
            else:
                loss = dkd_region(s, t, y, T, alpha, beta)
            weight = 1.0 if r == right[0] else comp
            complementary += weight != 1.0
            total += weight * loss
            count += 1
    return total / count, complementary


class Head:
    """What a term asks of kdrun.models.head.HeadSplit: the head after the global pooling."""

    def __init__(self, weight, bias):
        self.weight, self.bias = torch.tensor(weight, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)

    def pooled_head(self, v):
        return v @ self.weight.t() + self.bias


def sdd_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    s_map, t_map = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    s_head = (torch.randn(4, 2, generator=g).tolist(), torch.randn(4, generator=g).tolist())
    t_head = (torch.randn(4, 3, generator=g).mul(3).tolist(), torch.randn(4, generator=g).tolist())
    return s_map.double().tolist(), t_map.double().tolist(), s_head, t_head


def sdd_context(s_map, t_map, s_head, t_head, epoch=30):
    return StepContext(torch.zeros(3, 4, dtype=torch.float64), torch.tensor(TARGETS), torch.arange(3),
                       torch.zeros(3, 4, dtype=torch.float64), epoch=epoch,
                       student_map=torch.tensor(s_map, dtype=torch.float64),
                       teacher_map=torch.tensor(t_map, dtype=torch.float64),
                       student_head=Head(*s_head), teacher_head=Head(*t_head))


@pytest.mark.parametrize("base,scales", [("kd", [1, 2, 4]), ("dkd", [1, 2, 4]), ("kd", [1, 2])])
def test_sdd_matches_the_papers_loss(base, scales):
    s_map, t_map, s_head, t_head = sdd_inputs()
    expected, complementary = sdd_reference(s_map, t_map, s_head, t_head, TARGETS, scales, 4.0, base)
    assert complementary > 0  # both kinds of region occur
    term = SDDTerm(base=base, scales=scales, T=4.0, alpha=1.0, beta=8.0, warmup_epochs=20)
    assert term(sdd_context(s_map, t_map, s_head, t_head)).item() == pytest.approx(expected, abs=1e-12)
    # the warm-up follows DKD's: (epoch + 1) / warmup_epochs
    warm = term(sdd_context(s_map, t_map, s_head, t_head, epoch=4)).item()
    assert warm == pytest.approx(expected * 5 / 20, abs=1e-12)


@pytest.mark.parametrize("base", ["kd", "dkd"])
def test_sdd_is_zero_when_the_student_copies_the_teacher(base):
    _, t_map, _, t_head = sdd_inputs()
    assert SDDTerm(base=base)(sdd_context(t_map, t_map, t_head, t_head)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("options,message", [({"base": "nkd"}, "sdd.base"), ({"scales": [2, 4]}, "including 1"),
                                             ({"T": 0}, "sdd.T")])
def test_sdd_refuses_bad_settings(options, message):
    with pytest.raises(KdrunError, match=message):
        SDDTerm(**options)


def test_the_method_files_build_the_authors_terms():
    from test_feature_losses import compose_distill

    shapes = FeatureShapes(student_dim=8, teacher_dim=16, num_classes=10)
    kdpp = build_loss(compose_distill("distill=kdpp"), shapes)
    assert kdpp.weights == {"ce": 1.0, "kd": 1.0, "nd": 2.0} and kdpp.needs_head and kdpp.needs_class_means
    assert kdpp.terms["kd"].warmup_epochs == 20 and kdpp.terms["kd"].warmup_offset == 0
    dkdpp = build_loss(compose_distill("distill=dkdpp"), shapes)
    assert dkdpp.weights == {"ce": 1.0, "dkd": 1.0, "nd": 4.0}
    assert (dkdpp.terms["dkd"].alpha, dkdpp.terms["dkd"].beta, dkdpp.terms["dkd"].warmup_offset) == (0.5, 8.0, 0)
    sdd_kd = build_loss(compose_distill("distill=sdd_kd"), shapes)
    assert sdd_kd.weights == {"ce": 0.1, "sdd": 0.9} and sdd_kd.terms["sdd"].scales == [1, 2, 4]
    assert sdd_kd.needs_head and not sdd_kd.needs_class_means and not sdd_kd.needs_features
    sdd_dkd = build_loss(compose_distill("distill=sdd_dkd"), shapes)
    sdd = sdd_dkd.terms["sdd"]
    assert (sdd.base, sdd.beta, sdd.warmup_epochs) == ("dkd", 8.0, 20)


# --- the head split and the class means -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar:resnet8", "resnet10t", "torchvision:mobilenet_v3_small"])
def test_head_split_gives_the_models_logits_and_both_head_pieces(name):
    model = create_model(name, 10, 3).eval()
    split = build_head_split(model, name, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, final_map, embedding = split(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert final_map.dim() == 4 and final_map.shape[1] == split.map_channels
        assert torch.allclose(split.pooled_head(final_map.mean((2, 3))), logits, atol=1e-5)
        assert torch.allclose(split.classifier(embedding), logits, atol=1e-5)
    assert dict(split.named_parameters()).keys() == {f"model.{k}" for k, _ in model.named_parameters()}


def test_head_split_refuses_a_model_without_a_final_map():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with pytest.raises(KdrunError, match="final feature map"):
        build_head_split(model, "mlp", (3, 8, 8), role="teacher")


class EmbeddingTeacher(nn.Module):
    """Returns (logits, map, embedding) as a HeadSplit does; its embedding is the image's first two pixels."""
    embedding_dim = 2

    def forward(self, x):
        return x.new_zeros(len(x), 3), x, x.flatten(1)[:, :2]


def test_teacher_class_means_average_each_class_over_the_training_set():
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([0, 2, 0, 2, 2])
    from kdrun.data import InMemoryDataset

    data = InMemoryDataset(images, labels, mean=[0.0], std=[1 / 255])   # normalized values == the uint8 values
    means = teacher_class_means(EmbeddingTeacher(), data, 3, 2, torch.device("cpu"))
    pixels = images.flatten(1)[:, :2].double()
    expected = torch.stack([pixels[[0, 2]].mean(0), torch.zeros(2), pixels[[1, 3, 4]].mean(0)])
    assert torch.allclose(means.double(), expected)


def test_head_methods_refuse_stored_teacher_outputs_and_feature_terms():
    from test_feature_losses import compose_distill

    from kdrun.stages.heads import head_pairing
    from kdrun.stages.stored_teacher import check_method

    with pytest.raises(KdrunError, match="white-box teacher"):
        check_method(compose_distill("distill=sdd_kd"), "logits", "t.npz")
    with pytest.raises(KdrunError, match="use one kind per method"):
        head_pairing(None, None, None, {"name": "mix"}, pairing=object())
