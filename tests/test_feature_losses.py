"""FitNets, AT, NST, VID and ReviewKD against independent computations of the papers' equations.

The references below use explicit loops, `math` and elementary tensor ops (reshape-and-mean pooling,
hand-written BatchNorm and normalization), never the helpers of kdrun.distill.feature*.
"""
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from kdrun.config.schema import register_configs
from kdrun.distill import TERM_TYPES, FeatureShapes, StepContext, build_loss
from kdrun.distill.feature import FEATURE_TERMS, ATTerm, FitNetsTerm, NSTTerm, ReviewKDTerm, VIDTerm
from kdrun.distill.feature_review import hcl
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()

# Two matched stages: the student is thinner at both and larger than the teacher at the second.
SHAPES = FeatureShapes(student_channels=[8, 16], teacher_channels=[16, 32],
                       student_sizes=[(8, 8), (8, 8)], teacher_sizes=[(8, 8), (4, 4)])


def make_maps(shapes: FeatureShapes, batch: int = 4, seed: int = 0, grad: bool = True):
    generator = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, c, *hw, generator=generator).relu().requires_grad_(grad)
               for c, hw in zip(shapes.student_channels, shapes.student_sizes)]
    teacher = [torch.randn(batch, c, *hw, generator=generator).relu().requires_grad_(grad)
               for c, hw in zip(shapes.teacher_channels, shapes.teacher_sizes)]
    return student, teacher


def context(student, teacher, epoch: int = 0) -> StepContext:
    batch = student[0].shape[0]
    return StepContext(torch.zeros(batch, 10), torch.zeros(batch, dtype=torch.long), torch.arange(batch),
                       torch.zeros(batch, 10), epoch, student_features=student, teacher_features=teacher)


# --- independent references ---------------------------------------------------------------------------

def pool_by_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average over non-overlapping blocks: (B, C, H, W) -> (B, C, size, size), H and W multiples of size."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def batchnorm_by_hand(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Training-mode BatchNorm with weight 1 and bias 0: per channel over (B, H, W), biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def attention_by_hand(x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    a = (x * x).sum(dim=1).reshape(b, -1) / c
    return a / torch.sqrt((a * a).sum(dim=1, keepdim=True))


def mmd2_by_loops(s: torch.Tensor, t: torch.Tensor) -> float:
    """Squared MMD with k(x, y) = (x.y)^2 between the L2-normalized channel maps, averaged over the batch."""
    total = 0.0
    for b in range(s.shape[0]):
        fs = [s[b, j].flatten().tolist() for j in range(s.shape[1])]
        ft = [t[b, i].flatten().tolist() for i in range(t.shape[1])]
        fs = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in fs]
        ft = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in ft]
        k = lambda x, y: sum(xi * yi for xi, yi in zip(x, y)) ** 2  # noqa: E731
        k_tt = sum(k(x, y) for x in ft for y in ft) / len(ft) ** 2
        k_ss = sum(k(x, y) for x in fs for y in fs) / len(fs) ** 2
        k_st = sum(k(x, y) for x in fs for y in ft) / (len(fs) * len(ft))
        total += k_tt + k_ss - 2 * k_st
    return total / s.shape[0]


def assert_gradient_flow(term: nn.Module, student, teacher, epoch: int = 100) -> None:
    """Gradients reach the student maps and every parameter of the term, never the teacher maps."""
    loss = term(context(student, teacher, epoch))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for s in student:
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for t in teacher:
        assert t.grad is None
    for name, parameter in term.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# --- FitNets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [-1, -2])
def test_fitnets_is_mse_of_the_regressed_hint(layer):
    term = FitNetsTerm(SHAPES, layer=layer, regressor="conv_bn")   # kdrun's earlier regressor, kept as an option
    conv = term.regressor.layers[0]
    with torch.no_grad():  # identity on the student's channels, zeros on the extra teacher channels
        conv.weight.zero_()
        for c in range(conv.in_channels):
            conv.weight[c, c, 0, 0] = 1.0
    student, teacher = make_maps(SHAPES)
    s, t = student[layer], teacher[layer]
    if s.shape[-1] != t.shape[-1]:
        s = pool_by_blocks(s, t.shape[-1])
    padded = torch.cat([s, torch.zeros(s.shape[0], t.shape[1] - s.shape[1], *t.shape[2:])], dim=1)
    expected = ((batchnorm_by_hand(padded) - t) ** 2).sum() / t.numel()
    assert torch.allclose(term(context(student, teacher)), expected, atol=1e-5)


def test_fitnets_gradients_and_layer_range():
    term = FitNetsTerm(SHAPES, layer=-2)
    student, teacher = make_maps(SHAPES)
    loss = term(context(student, teacher))
    loss.backward()
    assert student[0].grad.abs().sum() > 0 and student[1].grad is None  # only the hint layer is used
    assert all(t.grad is None for t in teacher)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    one_pair = FeatureShapes([8], [16], [(4, 4)], [(4, 4)])
    assert FitNetsTerm(one_pair, layer=-1).layer == 0
    assert FitNetsTerm(one_pair).layer == 0  # the default falls back to the only pair
    assert FitNetsTerm(SHAPES).layer == len(SHAPES.student_channels) - 2  # else the second-deepest
    with pytest.raises(KdrunError, match="layer=-2"):
        FitNetsTerm(one_pair, layer=-2)


# --- AT ------------------------------------------------------------------------------------------------

def test_at_matches_a_hand_computed_example():
    # Student: mean over channels of F^2 is [[1, 2], [0, 0.5]], norm sqrt(5.25). Teacher: all ones -> 0.5 each.
    s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.0, 0.0]]]])
    t = torch.ones(1, 3, 2, 2)
    norm = math.sqrt(5.25)
    expected = sum((v / norm - 0.5) ** 2 for v in (1.0, 2.0, 0.0, 0.5)) / 4
    term = ATTerm(FeatureShapes([2], [3], [(2, 2)], [(2, 2)]))
    assert term(context([s], [t])).item() == pytest.approx(expected, rel=1e-6)


def test_at_sums_stages_after_resizing_the_student():
    term = ATTerm(SHAPES)
    student, teacher = make_maps(SHAPES)
    expected = sum(((attention_by_hand(s if s.shape[-1] == t.shape[-1] else pool_by_blocks(s, t.shape[-1]))
                     - attention_by_hand(t)) ** 2).mean() for s, t in zip(student, teacher))
    assert torch.allclose(term(context(student, teacher)), expected, atol=1e-7)


def test_at_is_zero_for_equal_features_and_only_the_student_gets_gradients():
    student, _ = make_maps(SHAPES)
    term = ATTerm(FeatureShapes([8, 16], [8, 16], [(8, 8)] * 2, [(8, 8)] * 2))
    assert term(context(student, [s.detach().clone() for s in student])).item() == pytest.approx(0.0, abs=1e-12)
    student, teacher = make_maps(SHAPES)
    assert_gradient_flow(ATTerm(SHAPES), student, teacher)


# --- NST -----------------------------------------------------------------------------------------------

def test_nst_matches_mmd_with_explicit_loops():
    shapes = FeatureShapes([3], [5], [(2, 2)], [(2, 2)])
    student, teacher = make_maps(shapes, batch=2, seed=3)
    student = [s.detach().abs() + 0.1 for s in student]   # no all-zero channel maps
    teacher = [t.detach().abs() + 0.1 for t in teacher]
    value = NSTTerm(shapes)(context(student, teacher))
    assert value.item() == pytest.approx(mmd2_by_loops(student[0], teacher[0]), rel=1e-5)


def test_nst_is_zero_for_the_same_channel_distribution():
    student, _ = make_maps(SHAPES)
    same = [s.detach().clone() for s in student]
    term = NSTTerm(FeatureShapes([8, 16], [8, 16], [(8, 8)] * 2, [(8, 8)] * 2))
    assert term(context(student, same)).item() == pytest.approx(0.0, abs=1e-6)
    # MMD compares distributions of channels: each channel repeated twice is the same distribution.
    doubled = [torch.cat([s, s], dim=1) for s in same]
    term = NSTTerm(FeatureShapes([8, 16], [16, 32], [(8, 8)] * 2, [(8, 8)] * 2))
    assert term(context(student, doubled)).item() == pytest.approx(0.0, abs=1e-6)


def test_nst_gradients():
    student, teacher = make_maps(SHAPES)
    assert_gradient_flow(NSTTerm(SHAPES), student, teacher)


# --- VID -----------------------------------------------------------------------------------------------

def test_vid_starts_at_init_pred_var_and_is_the_gaussian_nll():
    shapes = FeatureShapes([4], [4], [(4, 4)], [(2, 2)])
    term = VIDTerm(shapes, init_pred_var=5.0, eps=1e-5)
    stage = term.stages[0]
    alpha = stage.alpha.detach()
    assert torch.allclose(torch.log(1 + torch.exp(alpha)) + 1e-5, torch.full((4,), 5.0))
    with torch.no_grad():
        stage.alpha.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    stage.mean = nn.Identity()   # mu = the (pooled) student map, so the expectation can be written out
    student, teacher = make_maps(shapes, seed=1)
    mu = pool_by_blocks(student[0], 2)
    var = torch.tensor([math.log(1 + math.exp(a)) + 1e-5 for a in (-1.0, 0.0, 0.5, 2.0)]).view(1, 4, 1, 1)
    expected = (0.5 * ((teacher[0] - mu) ** 2 / var + torch.log(var))).sum() / teacher[0].numel()
    assert torch.allclose(term(context(student, teacher)), expected, atol=1e-6)


def test_vid_regressor_shape_and_gradients():
    term = VIDTerm(SHAPES)
    convs = [m for m in term.stages[1].mean if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 32), (32, 32), (32, 32)]
    student, teacher = make_maps(SHAPES)
    assert_gradient_flow(term, student, teacher)


# --- ReviewKD ------------------------------------------------------------------------------------------

def test_hcl_pyramid_weights():
    generator = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    expected = (mse(s, t) + 0.5 * mse(pool_by_blocks(s, 4), pool_by_blocks(t, 4))
                + 0.25 * mse(pool_by_blocks(s, 2), pool_by_blocks(t, 2))
                + 0.125 * mse(pool_by_blocks(s, 1), pool_by_blocks(t, 1))) / 1.875
    assert torch.allclose(hcl(s, t), expected, atol=1e-6)
    small_s, small_t = s[..., :2, :2], t[..., :2, :2]    # levels 4 and 2 are not below the height 2
    expected = (mse(small_s, small_t) + 0.5 * mse(pool_by_blocks(small_s, 1), pool_by_blocks(small_t, 1))) / 1.5
    assert torch.allclose(hcl(small_s, small_t), expected, atol=1e-6)


def test_reviewkd_fuses_deep_to_shallow_with_mismatched_channels_and_sizes():
    shapes = FeatureShapes([8, 16, 24], [16, 32, 48], [(16, 16), (4, 4), (4, 4)], [(8, 8), (8, 8), (2, 2)])
    term = ReviewKDTerm(shapes)
    assert [abf.attention is not None for abf in term.abfs] == [True, True, False]   # the deepest does not fuse
    assert all(abf.reduce[0].out_channels == 24 for abf in term.abfs)                # min(512, deepest student)
    assert [abf.project[0].out_channels for abf in term.abfs] == [16, 32, 48]
    student, teacher = make_maps(shapes)
    assert_gradient_flow(term, student, teacher, epoch=30)


def test_reviewkd_warmup():
    # Default: the ReviewKD authors' min(1, epoch / 20) with epochs counted from 0 (weight 0 in the first epoch).
    term = ReviewKDTerm(SHAPES, warmup_epochs=20)
    student, teacher = make_maps(SHAPES, grad=False)
    full = term(context(student, teacher, epoch=20))
    assert full > 0
    assert term(context(student, teacher, epoch=0)).item() == 0.0
    assert torch.allclose(term(context(student, teacher, epoch=1)), full / 20)
    assert torch.allclose(term(context(student, teacher, epoch=10)), full / 2)
    assert torch.allclose(term(context(student, teacher, epoch=19)), full * 19 / 20)
    assert torch.allclose(term(context(student, teacher, epoch=50)), full)
    # warmup_offset=1: mdistiller's schedule, one epoch ahead.
    ahead = ReviewKDTerm(SHAPES, warmup_epochs=20, warmup_offset=1)
    ahead.load_state_dict(term.state_dict())
    assert torch.allclose(ahead(context(student, teacher, epoch=0)), full / 20)
    assert torch.allclose(ahead(context(student, teacher, epoch=19)), full)
    with pytest.raises(KdrunError, match="warmup_offset"):
        ReviewKDTerm(SHAPES, warmup_offset=2)


# --- every term, and the method configs ----------------------------------------------------------------

def test_terms_declare_their_needs():
    assert set(FEATURE_TERMS) == {"fitnets", "at", "nst", "vid", "reviewkd", "fsp", "ab", "ft", "kdsvd", "ofd", "ickd",
                                  "srd"}
    for cls in FEATURE_TERMS.values():
        assert cls.needs_teacher and cls.needs_features


def compose_distill(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.distill, resolve=True)


@pytest.mark.parametrize("method,weight", [("fitnets", 100.0), ("at", 1000.0), ("nst", 50.0), ("vid", 1.0),
                                           ("reviewkd", 1.0)])
def test_method_configs_compose_and_build(method, weight, monkeypatch):
    distill = compose_distill(f"distill={method}")
    assert distill["name"] == method and set(distill["terms"]) == {"ce", method}
    assert distill["terms"]["ce"] == {"type": "ce", "weight": 1.0}
    assert distill["terms"][method]["type"] in FEATURE_TERMS and distill["terms"][method]["weight"] == weight
    # As the terms will be wired into kdrun.distill: the registry passes `shapes` to them.
    for name, cls in FEATURE_TERMS.items():
        monkeypatch.setitem(TERM_TYPES, name, cls)
    loss = build_loss(distill, SHAPES)
    assert loss.needs_teacher and loss.needs_features
    student, teacher = make_maps(SHAPES)
    ctx = context(student, teacher, epoch=0)
    ctx.student_logits.requires_grad_(True)
    total, parts = loss(ctx)
    assert set(parts) == {"ce", method} and torch.isfinite(total)
    total.backward()
    assert any(s.grad is not None for s in student) and all(t.grad is None for t in teacher)


# --- the reference codes' behaviour, float64 ------------------------------------------------------------

def conv2d_by_loops(x, weight, bias, stride: int, padding: int):
    """A plain convolution, one output element at a time (numpy), for small maps: (B, C, H, W) -> (B, O, H', W')."""
    import numpy as np
    x, weight, bias = x.detach().numpy(), weight.detach().numpy(), bias.detach().numpy()
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    padded = np.zeros((b, c, h + 2 * padding, w + 2 * padding))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = np.zeros((b, o, out_h, out_w))
    for n in range(b):
        for k in range(o):
            for i in range(out_h):
                for j in range(out_w):
                    window = padded[n, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    out[n, k, i, j] = (window * weight[k]).sum() + bias[k]
    return torch.from_numpy(out)


@pytest.mark.parametrize("student_size,kernel,stride,padding", [((8, 8), 3, 2, 1), ((4, 4), 1, 1, 0)])
def test_fitnets_default_regressor_is_conv_bn_relu_with_a_strided_conv_for_twice_the_size(
        student_size, kernel, stride, padding):
    # The reference codes' regressor: 3x3 stride-2 conv when the student map is twice the teacher's, else
    # (equal sizes) a 1x1 conv; then BatchNorm (training mode) and ReLU; the loss is the mean squared error.
    shapes = FeatureShapes([3], [5], [student_size], [(4, 4)])
    term = FitNetsTerm(shapes).double()
    conv = term.regressor[0]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((kernel, kernel), (stride, stride), (padding, padding))
    assert isinstance(term.regressor[2], nn.ReLU)
    student, teacher = make_maps(shapes, batch=3, seed=7)
    student, teacher = [student[0].detach().double()], [teacher[0].detach().double()]
    regressed = batchnorm_by_hand(conv2d_by_loops(student[0], conv.weight, conv.bias, stride, padding)).clamp_min(0)
    expected = ((regressed - teacher[0]) ** 2).sum() / teacher[0].numel()
    assert term(context(student, teacher)).item() == pytest.approx(expected.item(), rel=1e-12)


def test_fitnets_regressor_for_other_sizes_and_bad_names():
    # Larger by a non-doubling: a (1 + Hs - Ht) x (1 + Ws - Wt) conv; half the size: a 4x4 stride-2 transposed conv.
    assert FitNetsTerm(FeatureShapes([3], [5], [(6, 6)], [(4, 4)])).regressor[0].kernel_size == (3, 3)
    up = FitNetsTerm(FeatureShapes([3], [5], [(2, 2)], [(4, 4)])).regressor[0]
    assert isinstance(up, nn.ConvTranspose2d) and (up.kernel_size, up.stride) == ((4, 4), (2, 2))
    student, teacher = make_maps(FeatureShapes([3], [5], [(2, 2)], [(4, 4)]))
    assert torch.isfinite(FitNetsTerm(FeatureShapes([3], [5], [(2, 2)], [(4, 4)]))(context(student, teacher)))
    with pytest.raises(KdrunError, match="regressor"):
        FitNetsTerm(SHAPES, regressor="mlp")


SMALL_STUDENT = FeatureShapes(student_channels=[4], teacher_channels=[6], student_sizes=[(2, 2)],
                              teacher_sizes=[(4, 4)])


def double_maps(shapes, seed=11):
    student, teacher = make_maps(shapes, batch=3, seed=seed)
    return ([s.detach().double().abs() + 0.1 for s in student], [t.detach().double().abs() + 0.1 for t in teacher])


def test_at_pools_the_teacher_down_when_the_student_map_is_smaller():
    student, teacher = double_maps(SMALL_STUDENT)
    expected = ((attention_by_hand(student[0]) - attention_by_hand(pool_by_blocks(teacher[0], 2))) ** 2).mean()
    got = ATTerm(SMALL_STUDENT)(context(student, teacher))
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_nst_pools_the_teacher_down_when_the_student_map_is_smaller():
    student, teacher = double_maps(SMALL_STUDENT)
    got = NSTTerm(SMALL_STUDENT)(context(student, teacher))
    assert got.item() == pytest.approx(mmd2_by_loops(student[0], pool_by_blocks(teacher[0], 2)), rel=1e-12)


def test_vid_pools_the_teacher_down_when_the_student_map_is_smaller():
    shapes = FeatureShapes([4], [4], [(2, 2)], [(4, 4)])
    term = VIDTerm(shapes).double()
    term.stages[0].mean = nn.Identity()
    student, teacher = double_maps(shapes)
    var = math.log1p(math.exp(term.stages[0].alpha[0].item())) + 1e-5
    target = pool_by_blocks(teacher[0], 2)
    expected = (0.5 * ((target - student[0]) ** 2 / var + math.log(var))).mean()
    assert term(context(student, teacher)).item() == pytest.approx(expected.item(), rel=1e-12)


def test_reviewkd_abf_resizes_to_the_teacher_with_nearest_neighbours():
    # One stage (no fusion), the student map half the teacher's size: nearest upsampling repeats each pixel.
    shapes = FeatureShapes([4], [6], [(2, 2)], [(4, 4)])
    term = ReviewKDTerm(shapes, warmup_epochs=0).double()
    student, teacher = double_maps(shapes)
    abf = term.abfs[0]
    reduced = abf.reduce(student[0])
    repeated = reduced.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = hcl(abf.project(repeated), teacher[0])
    assert term(context(student, teacher)).item() == pytest.approx(expected.item(), rel=1e-12)
