"""OFD, ICKD and SRD against the papers' formulas, written out here with loops and elementary ops, float64."""
import math

import pytest
import torch
from torch import nn

from kdrun.distill import FeatureShapes, StepContext, build_loss, needs_teacher_classifier
from kdrun.distill.ickd import ICKDTerm
from kdrun.distill.ofd import OFDTerm, gaussian_margin, partial_l2
from kdrun.distill.srd import SRDTerm
from kdrun.errors import KdrunError

DTYPE = torch.float64


def maps(batch, channels, size, seed, relu=False):
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x.relu() if relu else x


def context(student, teacher, **extra) -> StepContext:
    batch = student[0].shape[0]
    return StepContext(torch.zeros(batch, 5, dtype=DTYPE), torch.zeros(batch, dtype=torch.long), torch.arange(batch),
                       extra.pop("teacher_logits", torch.zeros(batch, 5, dtype=DTYPE)),
                       student_features=student, teacher_features=teacher, **extra)


def batchnorm_by_hand(x, weight, bias, eps=1e-5):
    """Training-mode BatchNorm: per channel over every other axis, biased variance."""
    axes = [a for a in range(x.dim()) if a != 1]
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


def conv1x1_by_hand(x, weight):
    """A 1x1 convolution without bias as a sum over input channels: out[b, o] = sum_c w[o, c] x[b, c]."""
    out = torch.zeros(x.shape[0], weight.shape[0], *x.shape[2:], dtype=x.dtype)
    for o in range(weight.shape[0]):
        for c in range(weight.shape[1]):
            out[:, o] += weight[o, c, 0, 0] * x[:, c]
    return out


# --- OFD (Heo et al., ICCV 2019) ----------------------------------------------------------------------

def margin_by_integration(mean, std, steps=200000):
    """E[x | x < 0] for x ~ N(mean, std^2), by the midpoint rule over [mean - 12 std, 0]."""
    low = mean - 12 * std
    width = -low / steps
    num = den = 0.0
    for k in range(steps):
        x = low + (k + 0.5) * width
        density = math.exp(-((x - mean) / std) ** 2 / 2)
        num, den = num + x * density, den + density
    return num / den


def test_the_margin_is_the_mean_of_the_negative_part_of_the_bn_gaussian():
    cases = [(0.0, 1.0), (1.0, 2.0), (-0.5, 0.3), (2.0, -1.0)]   # a negative BN weight counts as its magnitude
    got = gaussian_margin(torch.tensor([m for m, _ in cases], dtype=DTYPE), torch.tensor([s for _, s in cases],
                                                                                         dtype=DTYPE))
    for value, (mean, std) in zip(got.tolist(), cases):
        assert value == pytest.approx(margin_by_integration(mean, abs(std)), rel=1e-6)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-12)   # half-normal: -sigma sqrt(2/pi)
    # Almost no negative responses (P(x < 0) <= 0.001): -3 std, as the authors' code.
    assert gaussian_margin(torch.tensor([4.0], dtype=DTYPE), torch.tensor([1.0], dtype=DTYPE)).item() == -3.0


def partial_l2_by_hand(student, teacher, margin):
    """sum over elements: 0 if s <= t' <= 0, else (s - t')^2, with t' = max(t, m) (m per channel)."""
    total = 0.0
    b, c, h, w = student.shape
    for n in range(b):
        for i in range(c):
            for y in range(h):
                for x in range(w):
                    s, t = float(student[n, i, y, x]), max(float(teacher[n, i, y, x]), float(margin[i]))
                    total += 0.0 if s <= t <= 0 else (s - t) ** 2
    return total


def test_partial_l2_skips_students_below_a_negative_teacher_target():
    student = torch.tensor([[[[-2.0, -0.5, 1.0, 0.5]], [[-3.0, 0.2, -1.0, 2.0]]]], dtype=DTYPE)
    teacher = torch.tensor([[[[-1.0, -1.0, -2.0, 1.5]], [[-0.1, -4.0, 0.0, 1.0]]]], dtype=DTYPE)
    margin = torch.tensor([-0.8, -0.5], dtype=DTYPE)
    # by hand: channel 0 targets (-0.8, -0.8, -0.8, 1.5): 0 + 0.09 + 3.24 + 1; channel 1 (-0.1, -0.5, 0, 1): 0 + 0.49 + 0 + 1
    assert partial_l2(student, teacher, margin.view(1, -1, 1, 1)).item() == pytest.approx(5.82, abs=1e-12)
    assert partial_l2_by_hand(student, teacher, margin) == pytest.approx(5.82, abs=1e-12)


OFD_SHAPES = FeatureShapes([4, 6], [5, 8], [(4, 4), (2, 2)], [(4, 4), (2, 2)],
                           teacher_bn=[(torch.tensor([0.5, -1.0, 0.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 0.5, -1.0, 1.0])),
                                       (torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))])


def test_ofd_weighs_the_stages_and_reads_the_margins_off_the_teacher_bn():
    term = OFDTerm(OFD_SHAPES).to(DTYPE)
    student = [maps(3, 4, (4, 4), 0).requires_grad_(), maps(3, 6, (2, 2), 1).requires_grad_()]
    teacher = [maps(3, 5, (4, 4), 2) * 2, maps(3, 8, (2, 2), 3) * 2]
    value = term(context(student, teacher))
    expected = 0.0
    for i, weight in enumerate((0.5, 1.0)):   # the shallower stage half the deeper one
        conv, bn = term.connectors[i]
        adapted = batchnorm_by_hand(conv1x1_by_hand(student[i], conv.weight), bn.weight, bn.bias).detach()
        mean, std = OFD_SHAPES.teacher_bn[i]
        margin = [margin_by_integration(m, abs(s), 20000) if 0.5 * math.erfc(m / abs(s) / math.sqrt(2)) > 0.001
                  else -3 * abs(s) for m, s in zip(mean.tolist(), std.tolist())]
        expected += weight * partial_l2_by_hand(adapted, teacher[i], margin) / 3
    assert value.item() == pytest.approx(expected, rel=1e-5)   # the margins by numerical integration
    value.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)


def test_ofd_is_zero_when_the_adapted_student_copies_the_teacher():
    shapes = FeatureShapes([5], [5], [(4, 4)], [(4, 4)], teacher_bn=[OFD_SHAPES.teacher_bn[0]])
    term = OFDTerm(shapes).to(DTYPE).eval()
    with torch.no_grad():
        term.connectors[0][0].weight.copy_(torch.eye(5, dtype=DTYPE)[..., None, None])
        term.connectors[0][1].running_var.fill_(1 - term.connectors[0][1].eps)   # BN: the identity
    teacher = maps(2, 5, (4, 4), 4)
    assert term(context([teacher.clone()], [teacher])).item() == 0.0
    below = torch.minimum(teacher, term.margin0) - 1   # under the negative targets: not penalized
    assert term(context([below], [torch.minimum(teacher, term.margin0 - 0.1)])).item() == 0.0
    assert term(context([teacher + 0.1], [teacher])).item() > 0


def test_ofd_without_bn_takes_the_margin_from_the_teacher_map_and_pools_it_to_the_student():
    term = OFDTerm(FeatureShapes([5], [5], [(2, 2)], [(4, 4)])).to(DTYPE)
    student, teacher = maps(3, 5, (2, 2), 0), maps(3, 5, (4, 4), 1) + 0.3
    value = term(context([student], [teacher]))
    pooled = teacher.reshape(3, 5, 2, 2, 2, 2).mean(dim=(3, 5))
    margin = [margin_by_integration(float(pooled[:, i].mean()), float(pooled[:, i].std(unbiased=False)), 20000)
              for i in range(5)]
    conv, bn = term.connectors[0]
    adapted = batchnorm_by_hand(conv1x1_by_hand(student, conv.weight), bn.weight, bn.bias).detach()
    assert value.item() == pytest.approx(partial_l2_by_hand(adapted, pooled, margin) / 3, rel=1e-5)


def test_cifar_resnet_and_wrn_taps_give_pre_relu_maps_and_their_bn():
    from kdrun.engine.forward import FeaturePairing
    from kdrun.models.factory import create_model
    from kdrun.models.features import build_feature_taps

    resnet = create_model("resnet8", num_classes=5, in_chans=3).eval()
    pre = build_feature_taps(resnet, "resnet8", (3, 16, 16), role="teacher", pre_relu=True)
    post = build_feature_taps(resnet, "resnet8", (3, 16, 16), role="teacher")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        (logits, pre_maps, _), (logits2, post_maps, _) = pre(x), post(x)
    assert pre.pre_relu and not post.pre_relu and post.bn_before_relu() is None
    assert torch.equal(logits, logits2) and all(m.min() < 0 for m in pre_maps)
    assert all(torch.equal(a.relu(), b) for a, b in zip(pre_maps, post_maps))
    assert pre.bn_before_relu()[-1] is resnet.stages[-1][-1].body[1][1]
    wrn = create_model("wrn_16_1", num_classes=5, in_chans=3)
    wrn_taps = build_feature_taps(wrn, "wrn_16_1", (3, 16, 16), role="student", pre_relu=True)
    assert wrn_taps.bn_before_relu()[-1] is wrn.head[0] and wrn_taps.bn_before_relu()[1] is wrn.stages[1][0].bn1
    shapes = FeaturePairing(wrn_taps, pre, [2, 3], [2, 3]).shapes((3, 16, 16), 5, 10)
    bias, weight = shapes.teacher_bn[1]
    assert torch.equal(bias, resnet.stages[-1][-1].body[1][1].bias) and torch.equal(weight, resnet.stages[-1][-1].body[1][1].weight)


# --- ICKD (Liu et al., ICCV 2021) ---------------------------------------------------------------------

def ickd_by_hand(student, teacher):
    """1/(B C) sum_b sum_ij (g_S - g_T)_ij^2, g = row-normalized G, G_ij = sum_k F_ik F_jk (k: positions)."""
    b, c = student.shape[:2]
    total = 0.0
    for n in range(b):
        grams = []
        for f in (student[n].reshape(c, -1), teacher[n].reshape(c, -1)):
            g = [[float((f[i] * f[j]).sum()) for j in range(c)] for i in range(c)]
            grams.append([[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g])
        total += sum((grams[0][i][j] - grams[1][i][j]) ** 2 for i in range(c) for j in range(c))
    return total / (b * c)


SHAPES = FeatureShapes(student_channels=[4, 6], teacher_channels=[5, 8], student_sizes=[(4, 4), (4, 4)],
                       teacher_sizes=[(4, 4), (2, 2)], student_dim=6, teacher_dim=8, num_classes=5)


def test_ickd_is_the_channel_correlation_distance_of_the_adapted_student_map():
    term = ICKDTerm(SHAPES).to(DTYPE)
    with torch.no_grad():
        term.embed[1].weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    student = [maps(3, 4, (4, 4), 0), maps(3, 6, (4, 4), 1).requires_grad_()]
    teacher = [maps(3, 5, (4, 4), 2), maps(3, 8, (2, 2), 3)]   # the deepest pair differs in size
    value = term(context(student, teacher))
    adapted = batchnorm_by_hand(conv1x1_by_hand(student[1], term.embed[0].weight), term.embed[1].weight,
                                term.embed[1].bias)
    assert value.item() == pytest.approx(ickd_by_hand(adapted.detach(), teacher[1]), rel=1e-12)
    value.backward()
    assert student[1].grad.abs().sum() > 0 and student[0].grad is None
    assert term.embed[0].weight.grad.abs().sum() > 0


def test_ickd_is_zero_when_the_adapted_student_map_copies_the_teacher():
    shapes = FeatureShapes([8], [8], [(4, 4)], [(4, 4)])
    term = ICKDTerm(shapes).to(DTYPE).eval()  # BN at its initial statistics: a scaling, which G's rows ignore
    with torch.no_grad():
        term.embed[0].weight.copy_(torch.eye(8, dtype=DTYPE)[..., None, None])
    teacher = maps(2, 8, (4, 4), 5)
    assert abs(term(context([teacher.clone()], [teacher])).item()) < 1e-14
    assert term(context([maps(2, 8, (4, 4), 6)], [teacher])).item() > 0.01


def test_ickd_layer_is_checked():
    assert ICKDTerm(SHAPES, layer=0).embed[0].in_channels == 4
    with pytest.raises(KdrunError, match=r"distill.terms.ickd.layer=2 is out of range .* -2..1"):
        ICKDTerm(SHAPES, layer=2)


# --- SRD (Yang et al., ICLR 2021) ---------------------------------------------------------------------

def srd_by_hand(adapted_map, teacher_map, weight, bias, teacher_logits, feat_weight):
    """feat_weight * mean_{b,c} (avg_hw A - avg_hw F_t)^2 + mean_{b,k} (W avg_hw A + bias - z_t)^2."""
    b, c = adapted_map.shape[:2]
    pooled = [[float(adapted_map[n, i].mean()) for i in range(c)] for n in range(b)]
    target = [[float(teacher_map[n, i].mean()) for i in range(c)] for n in range(b)]
    features = sum((pooled[n][i] - target[n][i]) ** 2 for n in range(b) for i in range(c)) / (b * c)
    k = weight.shape[0]
    logits = [[sum(float(weight[j, i]) * pooled[n][i] for i in range(c)) + float(bias[j]) for j in range(k)]
              for n in range(b)]
    mse = sum((logits[n][j] - float(teacher_logits[n, j])) ** 2 for n in range(b) for j in range(k)) / (b * k)
    return feat_weight * features + mse


def teacher_head(seed=7):
    head = nn.Linear(8, 5).to(DTYPE).requires_grad_(False)  # frozen, as the runner's teacher
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE))
    return head


@pytest.mark.parametrize("feat_weight", [1.0, 10.0])
def test_srd_map_is_the_feature_statistics_and_the_teacher_classifier_regression(feat_weight):
    term = SRDTerm(SHAPES, feat_weight=feat_weight).to(DTYPE)
    head = teacher_head()
    student = [maps(3, 4, (4, 4), 0), maps(3, 6, (4, 4), 1).requires_grad_()]
    teacher = [maps(3, 5, (4, 4), 2), maps(3, 8, (2, 2), 3, relu=True)]
    z_t = maps(3, 5, (1, 1), 4)[..., 0, 0]
    ctx = context(student, teacher, teacher_logits=z_t, teacher_embedding=teacher[1].mean((2, 3)),
                  teacher_classifier=head)
    value = term(ctx)
    conv, bn = term.connector[0], term.connector[1]
    adapted = batchnorm_by_hand(conv1x1_by_hand(student[1], conv.weight), bn.weight, bn.bias).relu()
    expected = srd_by_hand(adapted.detach(), teacher[1], head.weight, head.bias, z_t, feat_weight)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert student[1].grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0
    assert head.weight.grad is None   # the teacher's classifier stays frozen


def test_srd_embedding_adapts_the_pooled_features():
    term = SRDTerm(SHAPES, adapt="embedding").to(DTYPE)
    head = teacher_head()
    s_emb, t_emb = maps(4, 6, (1, 1), 0)[..., 0, 0].requires_grad_(), maps(4, 8, (1, 1), 1)[..., 0, 0]
    z_t = maps(4, 5, (1, 1), 2)[..., 0, 0]
    ctx = context([maps(4, 4, (4, 4), 3)], [maps(4, 5, (4, 4), 4)], teacher_logits=z_t, student_embedding=s_emb,
                  teacher_embedding=t_emb, teacher_classifier=head)
    value = term(ctx)
    conv, bn = term.connector[0], term.connector[1]
    adapted = batchnorm_by_hand(conv1x1_by_hand(s_emb[..., None, None], conv.weight), bn.weight, bn.bias).relu()
    expected = srd_by_hand(adapted.detach(), t_emb[..., None, None], head.weight, head.bias, z_t, 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert s_emb.grad.abs().sum() > 0


def test_srd_refuses_a_teacher_whose_classifier_does_not_read_its_pooled_last_map():
    with pytest.raises(KdrunError, match=r"srd.adapt=map needs .* 10 features, its deepest matched map 8 channels"):
        SRDTerm(FeatureShapes([4], [8], [(4, 4)], [(2, 2)], student_dim=4, teacher_dim=10))
    term = SRDTerm(SHAPES).to(DTYPE)
    teacher = [maps(2, 5, (4, 4), 2), maps(2, 8, (2, 2), 3)]
    ctx = context([maps(2, 4, (4, 4), 0), maps(2, 6, (4, 4), 1)], teacher, teacher_classifier=teacher_head(),
                  teacher_embedding=teacher[1].mean((2, 3)).relu() + 1)   # e.g. a WRN: BN-ReLU before pooling
    with pytest.raises(KdrunError, match=r"not the average of its deepest matched map: pass "
                                         r"distill.terms.srd.adapt=embedding"):
        term(ctx)
    with pytest.raises(KdrunError, match=r"distill.terms.srd.adapt='pool' is not one of map, embedding"):
        SRDTerm(SHAPES, adapt="pool")


def test_srd_is_the_only_term_asking_for_the_teacher_classifier():
    srd = {"name": "srd", "terms": {"ce": {"type": "ce"}, "srd": {"type": "srd", "weight": 1.0}}}
    assert needs_teacher_classifier(srd)
    assert not needs_teacher_classifier({**srd, "terms": {**srd["terms"], "srd": {"type": "srd", "weight": 0}}})
    assert not needs_teacher_classifier({"name": "ickd", "terms": {"ickd": {"type": "ickd", "weight": 2.5}}})
    loss = build_loss(srd, SHAPES)
    assert loss.needs_features and loss.needs_teacher


# --- the teacher's classifier, as SRD reuses it -------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet8", "torchvision:resnet18", "resnet10t"])  # CIFAR, FX and timm taps
def test_the_tapped_classifier_maps_the_embedding_to_the_logits(name):
    from kdrun.models.factory import create_model
    from kdrun.models.features import build_feature_taps
    from kdrun.models.features_classifier import tapped_classifier

    taps = build_feature_taps(create_model(name, num_classes=5, in_chans=3), name, (3, 32, 32), role="teacher")
    head = tapped_classifier(taps, (3, 32, 32))
    taps.eval()
    with torch.no_grad():
        logits, _, embedding = taps(torch.randn(2, 3, 32, 32))
        assert isinstance(head, nn.Linear) and head.out_features == 5
        assert torch.allclose(head(embedding), logits, atol=1e-6)


class ScaledLogits(nn.Module):
    """A classifier whose Linear output is not yet the logits (it is doubled after)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        return 2 * self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


def test_a_teacher_without_a_separable_classifier_is_one_line():
    from kdrun.models.features import build_feature_taps
    from kdrun.models.features_classifier import tapped_classifier

    taps = build_feature_taps(ScaledLogits(), "scaled", (3, 8, 8), role="teacher")
    with pytest.raises(KdrunError, match=r"teacher 'scaled' has no classifier layer that maps its embedding to its "
                                         r"logits"):
        tapped_classifier(taps, (3, 8, 8))


def test_a_step_hands_the_teacher_classifier_to_the_terms():
    from kdrun.engine.forward import FeaturePairing, StepForward
    from kdrun.models.factory import create_model
    from kdrun.models.features import build_feature_taps
    from kdrun.models.features_classifier import tapped_classifier

    taps = [build_feature_taps(create_model(name, num_classes=5, in_chans=3), name, (3, 16, 16), role=role)
            for name, role in (("resnet8", "student"), ("resnet14", "teacher"))]
    head = tapped_classifier(taps[1], (3, 16, 16))
    taps[1].model.eval().requires_grad_(False)   # as StepForward.prepare_teacher leaves it
    pairing = FeaturePairing(taps[0], taps[1], [1, 2, 3], [1, 2, 3], head)
    term = SRDTerm(pairing.shapes((3, 16, 16), 5, 8))
    ctx = StepForward(taps[0].model, taps[1].model, pairing)(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long),
                                                             torch.arange(4), 0)
    assert ctx.teacher_classifier is head is taps[1].model.head[-1]
    value = term(ctx)
    value.backward()
    assert torch.isfinite(value) and head.weight.grad is None
    assert all(p.grad is not None for p in term.connector.parameters())
