"""RKD, PKT, CC, SP and CRD against independent computations of the papers' equations.

The references below use explicit loops over samples, `math` and Python floats, never the helpers of
kdrun.distill.relation*.
"""
import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config.schema import register_configs
from kdrun.distill import TERM_TYPES, FeatureShapes, StepContext, build_loss
from kdrun.distill.relation import RELATION_TERMS, CCTerm, CRDTerm, PKTTerm, RKDTerm, SPTerm
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()

# Four samples; the student's embedding is narrower than the teacher's.
STUDENT = torch.tensor([[1.0, 0.0, 2.0],
                        [0.5, 1.5, -1.0],
                        [-1.0, 2.0, 0.0],
                        [3.0, -0.5, 1.0]])
TEACHER = torch.tensor([[0.2, 1.0, 0.0, -1.0, 0.5],
                        [1.0, 0.0, 2.0, 0.5, -0.5],
                        [0.0, -2.0, 1.0, 1.0, 1.0],
                        [1.5, 0.5, -0.5, 0.0, 2.0]])
SHAPES = FeatureShapes(student_channels=[2, 3], teacher_channels=[4, 2], student_sizes=[(2, 2), (2, 2)],
                       teacher_sizes=[(4, 4), (1, 1)], student_dim=3, teacher_dim=5, num_classes=10, num_samples=50)


def context(student=STUDENT, teacher=TEACHER, indices=None, maps=None, grad=True) -> StepContext:
    """A step with the given embeddings (fresh leaves, so gradients can be checked) and feature maps."""
    student, teacher = student.clone().requires_grad_(grad), teacher.clone().requires_grad_(grad)
    batch = student.shape[0]
    if indices is None:
        indices = torch.arange(batch)
    s_maps, t_maps = maps if maps is not None else (None, None)
    return StepContext(torch.zeros(batch, 10), torch.zeros(batch, dtype=torch.long), indices,
                       torch.zeros(batch, 10), 0, student_features=s_maps, teacher_features=t_maps,
                       student_embedding=student, teacher_embedding=teacher)


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def cosine(a, b) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def huber(a: float, b: float) -> float:
    """Park et al. Eq. (5) with delta = 1."""
    d = abs(a - b)
    return 0.5 * d * d if d <= 1 else d - 0.5


# --- RKD ------------------------------------------------------------------------------------------------

def rkd_distance_by_loops(s, t) -> float:
    def psi(e):
        n = len(e)
        dist = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        pairs = [dist[i][j] for i in range(n) for j in range(n) if i != j]
        mu = sum(pairs) / len(pairs)
        return [[d / mu for d in row] for row in dist]
    ps, pt = psi(rows(s)), psi(rows(t))
    n = len(ps)
    return sum(huber(ps[i][j], pt[i][j]) for i in range(n) for j in range(n)) / n ** 2


def rkd_angle_by_loops(s, t) -> float:
    def psi(e, i, j, k):  # cos of the angle at e_j; degenerate triplets count as 0
        if i == j or k == j:
            return 0.0
        a = [x - y for x, y in zip(e[i], e[j])]
        b = [x - y for x, y in zip(e[k], e[j])]
        return cosine(a, b)
    s, t = rows(s), rows(t)
    n = len(s)
    triplets = list(itertools.product(range(n), repeat=3))
    return sum(huber(psi(s, i, j, k), psi(t, i, j, k)) for i, j, k in triplets) / n ** 3


def test_rkd_distance_and_angle_match_the_paper_on_four_samples():
    distance, angle = rkd_distance_by_loops(STUDENT, TEACHER), rkd_angle_by_loops(STUDENT, TEACHER)
    assert distance > 0 and angle > 0
    only_distance = RKDTerm(distance_weight=1.0, angle_weight=0.0)(context())
    only_angle = RKDTerm(distance_weight=0.0, angle_weight=1.0)(context())
    assert only_distance.item() == pytest.approx(distance, rel=1e-5)
    assert only_angle.item() == pytest.approx(angle, rel=1e-5)
    assert RKDTerm()(context()).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-5)


def test_rkd_huber_switches_to_l1_for_large_differences():
    # Scaled copies have identical relations; a reflected sample flips angles by more than 1.
    teacher = STUDENT * 3.0
    assert RKDTerm()(context(STUDENT, teacher)).item() == pytest.approx(0.0, abs=1e-6)
    flipped = STUDENT.clone()
    flipped[0] = -flipped[0]
    s, f = rows(STUDENT), rows(flipped)
    # the angle at sample 1 between samples 0 and 3 changes by more than 1: the L1 branch is exercised
    a, b = ([x - y for x, y in zip(e[0], e[1])] for e in (s, f))
    c, d = ([x - y for x, y in zip(e[3], e[1])] for e in (s, f))
    assert abs(cosine(a, c) - cosine(b, d)) > 1
    expected = rkd_angle_by_loops(STUDENT, flipped)
    assert RKDTerm(0.0, 1.0)(context(STUDENT, flipped)).item() == pytest.approx(expected, rel=1e-5)


# --- PKT ------------------------------------------------------------------------------------------------

def pkt_by_loops(s, t, eps=1e-7) -> float:
    def probabilities(e):
        n = len(e)
        kernel = [[(cosine(e[i], e[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k / sum(row) for k in row] for row in kernel]
    ps, pt = probabilities(rows(s)), probabilities(rows(t))
    n = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n ** 2


def test_pkt_is_the_kl_of_cosine_kernel_probabilities():
    expected = pkt_by_loops(STUDENT, TEACHER)
    assert expected > 0
    assert PKTTerm()(context()).item() == pytest.approx(expected, rel=1e-4)


# --- CC -------------------------------------------------------------------------------------------------

def cc_by_loops(s, t, gamma=0.4, order=2) -> float:
    def correlation(e):
        n = len(e)
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine(e[i], e[j]) ** p
                     for p in range(order + 1)) for j in range(n)] for i in range(n)]
    cs, ct = correlation(rows(s)), correlation(rows(t))
    n = len(cs)
    return sum((ct[i][j] - cs[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def test_cc_matches_the_taylor_expanded_rbf_correlations():
    same_width = FeatureShapes(student_dim=5, teacher_dim=5)
    student = torch.cat([STUDENT, torch.tensor([[0.5, -1.0]] * 4)], dim=1)  # widen to 5 columns
    term = CCTerm(same_width)
    assert isinstance(term.embed, torch.nn.Identity)
    assert term(context(student, TEACHER)).item() == pytest.approx(cc_by_loops(student, TEACHER), rel=1e-5)
    term = CCTerm(same_width, gamma=0.3, order=3)
    assert term(context(student, TEACHER)).item() == pytest.approx(cc_by_loops(student, TEACHER, 0.3, 3), rel=1e-5)


def test_cc_taylor_expansion_approaches_the_gaussian_rbf():
    # A high order reproduces exp(-gamma ||f_i - f_j||^2) of the normalized rows exactly.
    term = CCTerm(FeatureShapes(student_dim=5, teacher_dim=5), gamma=0.4, order=20)
    identical = torch.zeros(4, 5)
    identical[:, 0] = 1.0  # all rows equal: correlation exp(0) = 1 everywhere
    t = rows(TEACHER)
    units = [[x / math.sqrt(dot(r, r)) for x in r] for r in t]
    exact = [[math.exp(-0.4 * math.dist(a, b) ** 2) for b in units] for a in units]
    expected = sum((exact[i][j] - 1.0) ** 2 for i in range(4) for j in range(4)) / 16
    assert term(context(identical, TEACHER)).item() == pytest.approx(expected, rel=1e-5)


def test_cc_embeds_the_student_when_widths_differ():
    term = CCTerm(SHAPES)
    assert isinstance(term.embed, torch.nn.Linear) and term.embed.weight.shape == (5, 3)
    ctx = context()
    loss = term(ctx)
    with torch.no_grad():
        embedded = STUDENT @ term.embed.weight.t() + term.embed.bias
    assert loss.item() == pytest.approx(cc_by_loops(embedded, TEACHER), rel=1e-5)
    loss.backward()
    assert ctx.student_embedding.grad.abs().sum() > 0 and ctx.teacher_embedding.grad is None
    assert term.embed.weight.grad.abs().sum() > 0
    assert isinstance(CCTerm(SHAPES, embed=False).embed, torch.nn.Identity)
    with pytest.raises(KdrunError, match="order=-1"):
        CCTerm(SHAPES, order=-1)


# --- SP -------------------------------------------------------------------------------------------------

def sp_stage_by_loops(s: torch.Tensor, t: torch.Tensor) -> float:
    def gram(x):
        flat = [x[b].flatten().tolist() for b in range(x.shape[0])]
        g = [[dot(a, b) for b in flat] for a in flat]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in g]
    gs, gt = gram(s), gram(t)
    n = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def make_maps(batch=4, seed=0, grad=True):
    generator = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, c, *hw, generator=generator).abs().requires_grad_(grad)
               for c, hw in zip(SHAPES.student_channels, SHAPES.student_sizes)]
    teacher = [torch.randn(batch, c, *hw, generator=generator).abs().requires_grad_(grad)
               for c, hw in zip(SHAPES.teacher_channels, SHAPES.teacher_sizes)]
    return student, teacher


def test_sp_compares_normalized_gram_matrices_of_the_last_stage():
    student, teacher = make_maps()
    expected = sp_stage_by_loops(student[-1], teacher[-1])
    assert expected > 0
    loss = SPTerm(SHAPES)(context(maps=(student, teacher)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student[1].grad.abs().sum() > 0 and student[0].grad is None
    assert all(t.grad is None for t in teacher)


def test_sp_averages_the_chosen_stages_and_checks_their_range():
    student, teacher = make_maps()
    expected = (sp_stage_by_loops(student[0], teacher[0]) + sp_stage_by_loops(student[1], teacher[1])) / 2
    loss = SPTerm(SHAPES, stages=[0, -1])(context(maps=(student, teacher)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KdrunError, match="stages"):
        SPTerm(SHAPES, stages=[2])


# --- shared properties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: RKDTerm(), lambda: PKTTerm(),
                                  lambda: CCTerm(FeatureShapes(student_dim=5, teacher_dim=5)), lambda: SPTerm(SHAPES)],
                         ids=["rkd", "pkt", "cc", "sp"])
def test_zero_when_the_student_equals_the_teacher(make):
    same_width = torch.cat([STUDENT, torch.tensor([[0.5, -1.0]] * 4)], dim=1)
    student, _ = make_maps()
    maps = ([m.detach().clone() for m in student], [m.detach().clone() for m in student])
    assert make()(context(same_width, same_width, maps=maps)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("make", [lambda: RKDTerm(), lambda: PKTTerm(), lambda: CCTerm(SHAPES),
                                  lambda: CRDTerm(SHAPES, feat_dim=8)], ids=["rkd", "pkt", "cc", "crd"])
def test_only_the_student_and_the_term_get_gradients(make):
    term = make()
    ctx = context(indices=torch.tensor([3, 7, 11, 40]))
    term(ctx).backward()
    assert ctx.student_embedding.grad is not None and ctx.student_embedding.grad.abs().sum() > 0
    assert ctx.teacher_embedding.grad is None
    for name, parameter in term.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_terms_declare_their_needs():
    assert set(RELATION_TERMS) == {"rkd", "pkt", "cc", "sp", "crd"}
    for cls in RELATION_TERMS.values():
        assert cls.needs_teacher and cls.needs_features


# --- CRD ------------------------------------------------------------------------------------------------

def test_crd_memory_banks_are_buffers_updated_at_the_batch_indices():
    term = CRDTerm(SHAPES, feat_dim=8)
    state = term.state_dict()
    assert state["memory_student"].shape == state["memory_teacher"].shape == (50, 8)
    assert {name for name, _ in term.named_parameters()} == {"embed_student.weight", "embed_student.bias",
                                                             "embed_teacher.weight", "embed_teacher.bias"}
    before_s, before_t = term.memory_student.clone(), term.memory_teacher.clone()
    indices = torch.tensor([3, 7, 11, 40])
    loss = term.train()(context(indices=indices))
    assert torch.isfinite(loss) and loss.item() > 0

    def expected(memory, x, linear):  # normalize(0.5 * m + 0.5 * normalize(W x + b)), by hand
        z = x @ linear.weight.detach().t() + linear.bias.detach()
        z = z / z.pow(2).sum(1, keepdim=True).sqrt()
        mixed = 0.5 * memory[indices] + 0.5 * z
        return mixed / mixed.pow(2).sum(1, keepdim=True).sqrt()

    assert torch.allclose(term.memory_student[indices], expected(before_s, STUDENT, term.embed_student), atol=1e-6)
    assert torch.allclose(term.memory_teacher[indices], expected(before_t, TEACHER, term.embed_teacher), atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(term.memory_student[untouched], before_s[untouched])
    assert torch.equal(term.memory_teacher[untouched], before_t[untouched])
    # Evaluation mode reads the memory but leaves it alone.
    after = term.memory_student.clone()
    term.eval()(context(indices=indices))
    assert torch.equal(term.memory_student, after)


def test_crd_is_the_symmetric_softmax_contrast_over_one_negative():
    # With two samples the single negative of each sample is the other one: the loss is deterministic.
    term = CRDTerm(FeatureShapes(student_dim=3, teacher_dim=5, num_samples=2), feat_dim=4, nce_t=0.5,
                   objective="infonce").eval()
    assert term.nce_k == 1
    s, t = STUDENT[:2], TEACHER[:2]
    ms, mt = rows(term.memory_student), rows(term.memory_teacher)

    def embedded(x, linear):
        z = (x @ linear.weight.detach().t() + linear.bias.detach()).tolist()
        return [[v / math.sqrt(dot(r, r)) for v in r] for r in z]

    positions = [1, 0]  # sample 0 of the batch is sample 1 of the dataset and vice versa

    def info_nce(anchors, memory):
        total = 0.0
        for z, i in zip(anchors, positions):
            pos, neg = dot(z, memory[i]) / 0.5, dot(z, memory[1 - i]) / 0.5
            total += -pos + math.log(math.exp(pos) + math.exp(neg))
        return total / len(anchors)

    expected = info_nce(embedded(s, term.embed_student), mt) + info_nce(embedded(t, term.embed_teacher), ms)
    loss = term(context(s, t, indices=torch.tensor(positions)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_crd_nce_objective_follows_the_paper_with_z_fixed_on_the_first_batch():
    # Two samples: the single negative of each is the other one (deterministic). Paper eq. 19, P_n = 1/N, M = 1.
    term = CRDTerm(FeatureShapes(student_dim=3, teacher_dim=5, num_samples=2), feat_dim=4, nce_t=0.5).eval()
    assert term.objective == "nce" and term.nce_k == 1
    s, t = STUDENT[:2], TEACHER[:2]
    ms, mt = rows(term.memory_student), rows(term.memory_teacher)

    def embedded(x, linear):
        z = (x @ linear.weight.detach().t() + linear.bias.detach()).tolist()
        return [[v / math.sqrt(dot(r, r)) for v in r] for r in z]

    positions = [1, 0]

    def nce(anchors, memory):
        scores = [[math.exp(dot(z, memory[i]) / 0.5), math.exp(dot(z, memory[1 - i]) / 0.5)]
                  for z, i in zip(anchors, positions)]
        z_const = 2 * sum(sum(row) for row in scores) / 4  # N * mean over the batch's 2 x 2 scores
        noise = 1 / 2                                     # M * P_n
        total = 0.0
        for positive, negative in scores:
            h_pos, h_neg = positive / z_const, negative / z_const
            total += math.log(h_pos / (h_pos + noise + 1e-7)) + math.log(noise / (h_neg + noise + 1e-7))
        return -total / len(anchors), z_const

    expected_s, z_s = nce(embedded(s, term.embed_student), mt)
    expected_t, z_t = nce(embedded(t, term.embed_teacher), ms)
    loss = term(context(s, t, indices=torch.tensor(positions)))
    assert loss.item() == pytest.approx(expected_s + expected_t, rel=1e-5)
    assert term.nce_z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    # Z stays fixed afterwards, and is part of the state saved in checkpoints.
    term(context(s * 2, t, indices=torch.tensor(positions)))
    assert term.nce_z.tolist() == pytest.approx([z_s, z_t], rel=1e-5) and "nce_z" in term.state_dict()
    with pytest.raises(KdrunError, match="objective=nc must be nce"):
        CRDTerm(SHAPES, objective="nc")


def test_crd_clamps_nce_k_and_samples_other_indices():
    term = CRDTerm(SHAPES)
    assert term.nce_k == 49
    torch.manual_seed(0)
    indices = torch.tensor([0, 5, 49, 49])
    contrast = term.sample_contrast(indices)
    assert contrast.shape == (4, 50) and torch.equal(contrast[:, 0], indices)
    assert ((contrast[:, 1:] != indices.unsqueeze(1)) & (contrast[:, 1:] >= 0) & (contrast[:, 1:] < 50)).all()
    assert CRDTerm(SHAPES, nce_k=10).nce_k == 10


def test_crd_errors_are_one_line():
    term = CRDTerm(SHAPES, feat_dim=8)
    ctx = context()
    ctx.indices = None
    with pytest.raises(KdrunError, match="crd needs sample indices") as error:
        term(ctx)
    assert "\n" not in str(error.value)
    with pytest.raises(KdrunError, match="num_samples=0") as error:
        CRDTerm(FeatureShapes(student_dim=3, teacher_dim=5))
    assert "\n" not in str(error.value)


# --- method configs -------------------------------------------------------------------------------------

def compose_distill(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.distill, resolve=True)


@pytest.mark.parametrize("method,weight", [("rkd", 1.0), ("pkt", 30000.0), ("cc", 100.0), ("sp", 3000.0),
                                           ("crd", 0.8)])
def test_method_configs_compose_and_build(method, weight, monkeypatch):
    distill = compose_distill(f"distill={method}")
    assert distill["name"] == method and distill["terms"]["ce"] == {"type": "ce", "weight": 1.0}
    assert distill["terms"][method]["type"] in RELATION_TERMS and distill["terms"][method]["weight"] == weight
    extra = set(distill["terms"]) - {"ce", method}
    assert extra == ({"kd"} if method == "crd" else set())
    if method == "crd":  # CRD alone by default; CRD+KD with distill.terms.kd.weight=1
        assert distill["terms"]["kd"]["weight"] == 0.0 and distill["terms"]["kd"]["T"] == 4.0
    # As the terms will be wired into kdrun.distill: the registry passes `shapes` to those that take it.
    for name, cls in RELATION_TERMS.items():
        monkeypatch.setitem(TERM_TYPES, name, cls)
    loss = build_loss(distill, SHAPES)
    assert set(loss.terms) == {"ce", method} and loss.needs_teacher and loss.needs_features
    student, teacher = make_maps()
    ctx = context(indices=torch.tensor([3, 7, 11, 40]), maps=(student, teacher))
    total, parts = loss(ctx)
    assert set(parts) == {"ce", method} and torch.isfinite(total)
