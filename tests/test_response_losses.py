"""DKD, DIST, MLKD and logit standardization against independent computations of the papers' equations.

The references below use plain Python lists, `math` and numpy, never the helpers of kdrun.distill.response.
"""
import math
import statistics

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config.schema import register_configs
from kdrun.distill import StepContext, build_loss
from kdrun.distill.response import DISTTerm, DKDTerm, KDTerm, MLKDTerm, dkd_parts, kd_divergence
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()

# A fixed 3-sample, 4-class example.
STUDENT = [[2.0, 1.0, 0.1, -1.0], [0.5, 0.5, 2.5, 0.0], [-1.0, 3.0, 0.0, 1.0]]
TEACHER = [[3.0, 0.5, 0.0, -0.5], [0.0, 1.0, 3.0, -1.0], [0.5, 2.0, 1.0, 0.0]]
TARGETS = [0, 2, 3]


# --- independent references ---------------------------------------------------------------------------

def softmax(values, T=1.0):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    """KL(p || q) of two lists of probabilities."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def dkd_reference(student, teacher, targets, T):
    """TCKD and NCKD as defined in the DKD paper: b = [p_t, 1 - p_t], p^_i = p_i / (1 - p_t) for i != t."""
    tckd = nckd = 0.0
    for s, t, y in zip(student, teacher, targets):
        p_s, p_t = softmax(s, T), softmax(t, T)
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        hat_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
        hat_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
        nckd += kl(hat_t, hat_s)
    n = len(student)
    return T * T * tckd / n, T * T * nckd / n


def dist_reference(student, teacher, T, beta, gamma):
    y_s = np.array([softmax(row, T) for row in student])
    y_t = np.array([softmax(row, T) for row in teacher])
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(y_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(y_s.shape[1])])
    return T * T * (beta * inter + gamma * intra)


def mlkd_reference(student, teacher, temperatures, weights):
    """Instance KL, B x B sample-similarity and K x K class-correlation alignments, summed over T."""
    total = 0.0
    for T in temperatures:
        p_s = [softmax(row, T) for row in student]
        p_t = [softmax(row, T) for row in teacher]
        n, k = len(p_s), len(p_s[0])
        instance = T * T * sum(kl(pt, ps) for ps, pt in zip(p_s, p_t)) / n
        batch = sum((dot(p_t[i], p_t[j]) - dot(p_s[i], p_s[j])) ** 2 for i in range(n) for j in range(n)) / n
        class_t = [[sum(p[a] * p[b] for p in p_t) for b in range(k)] for a in range(k)]
        class_s = [[sum(p[a] * p[b] for p in p_s) for b in range(k)] for a in range(k)]
        classes = sum((class_t[a][b] - class_s[a][b]) ** 2 for a in range(k) for b in range(k)) / k
        total += weights[0] * instance + weights[1] * batch + weights[2] * classes
    return total


def mlkd_augmented_reference(s_weak, t_weak, s_strong, t_strong, temperatures, weights):
    """MLKD with prediction augmentation: weak-view levels masked by the teacher's confidence at T=1
    (samples and classes at or below the median), plus the strong view's unmasked instance term."""
    n, k = len(t_weak), len(t_weak[0])
    p1 = [softmax(row) for row in t_weak]
    confidence = [max(p) for p in p1]
    keep = [c <= statistics.median(confidence) for c in confidence]
    class_confidence = [sum(p[a] for p in p1) for a in range(k)]
    keep_class = [c <= statistics.median(class_confidence) for c in class_confidence]
    total = 0.0
    for T in temperatures:
        p_s = [softmax(row, T) for row in s_weak]
        p_t = [softmax(row, T) for row in t_weak]
        instance = T * T * sum(kl(p_t[i], p_s[i]) for i in range(n) if keep[i]) / n
        batch = sum((dot(p_t[i], p_t[j]) - dot(p_s[i], p_s[j])) ** 2
                    for i in range(n) if keep[i] for j in range(n)) / n
        class_t = [[sum(p[a] * p[b] for p in p_t) for b in range(k)] for a in range(k)]
        class_s = [[sum(p[a] * p[b] for p in p_s) for b in range(k)] for a in range(k)]
        classes = sum((class_t[a][b] - class_s[a][b]) ** 2 for a in range(k) if keep_class[a] for b in range(k)) / k
        strong = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(s_strong, t_strong)) / n
        total += weights[0] * (instance + strong) + weights[1] * batch + weights[2] * classes
    return total


def zscore(values):
    """Per-sample z-score with the sample (K - 1) standard deviation, as the authors' code."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-7) for v in values]


def context(student, teacher, targets=None, epoch=0):
    student, teacher = torch.as_tensor(student), torch.as_tensor(teacher)
    if targets is None:
        targets = torch.zeros(student.shape[0], dtype=torch.long)
    return StepContext(student, torch.as_tensor(targets), torch.arange(student.shape[0]), teacher, epoch=epoch)


# --- DKD ----------------------------------------------------------------------------------------------

def test_dkd_parts_match_the_paper_definitions():
    T = 2.0
    tckd, nckd = dkd_parts(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS), T)
    expected_tckd, expected_nckd = dkd_reference(STUDENT, TEACHER, TARGETS, T)
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-5)


def test_dkd_term_weighs_tckd_and_nckd():
    term = DKDTerm(alpha=0.5, beta=8.0, T=4.0, warmup_epochs=20)
    tckd, nckd = dkd_reference(STUDENT, TEACHER, TARGETS, 4.0)
    got = term(context(STUDENT, TEACHER, TARGETS, epoch=25))
    assert got.item() == pytest.approx(0.5 * tckd + 8.0 * nckd, rel=1e-5)


def test_dkd_decomposes_classical_kd_per_sample():
    # The paper's reformulation: KD = TCKD + (1 - p_t^teacher) * NCKD, sample by sample.
    T = 3.0
    for s, t, y in zip(STUDENT, TEACHER, TARGETS):
        tckd, nckd = dkd_reference([s], [t], [y], T)
        kd = kd_divergence(torch.tensor([s]), torch.tensor([t]), T).item()
        assert kd == pytest.approx(tckd + (1 - softmax(t, T)[y]) * nckd, rel=1e-5)


def test_dkd_is_zero_for_identical_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    loss = DKDTerm(warmup_epochs=0)(context(logits, logits.clone(), torch.randint(0, 5, (6,))))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_dkd_is_finite_with_two_classes(scale):
    torch.manual_seed(0)
    student = (scale * torch.randn(8, 2)).requires_grad_(True)
    teacher, targets = scale * torch.randn(8, 2), torch.randint(0, 2, (8,))
    tckd, nckd = dkd_parts(student, teacher, targets, 4.0)
    assert nckd.item() == 0.0  # one non-target class: its distribution is [1] for both models
    loss = DKDTerm(warmup_epochs=0)(context(student, teacher, targets))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # With two classes the binary distribution is the full one: TCKD is classical KD.
    assert tckd.item() == pytest.approx(kd_divergence(student, teacher, 4.0).item(), rel=1e-5)


def test_dkd_warmup_ramps_linearly_from_the_first_epoch():
    term = DKDTerm(warmup_epochs=20)
    full = term(context(STUDENT, TEACHER, TARGETS, epoch=100)).item()
    assert term(context(STUDENT, TEACHER, TARGETS, epoch=0)).item() == pytest.approx(full / 20, rel=1e-6)
    assert term(context(STUDENT, TEACHER, TARGETS, epoch=9)).item() == pytest.approx(full / 2, rel=1e-6)
    assert term(context(STUDENT, TEACHER, TARGETS, epoch=19)).item() == pytest.approx(full, rel=1e-6)
    no_warmup = DKDTerm(warmup_epochs=0)(context(STUDENT, TEACHER, TARGETS, epoch=0)).item()
    assert no_warmup == pytest.approx(full, rel=1e-6)


# --- DIST ---------------------------------------------------------------------------------------------

def test_dist_matches_numpy_pearson():
    got = DISTTerm(beta=1.0, gamma=2.0, T=2.0)(context(STUDENT, TEACHER))
    assert got.item() == pytest.approx(dist_reference(STUDENT, TEACHER, 2.0, 1.0, 2.0), rel=1e-4)


def test_dist_is_zero_for_identical_logits_and_ignores_shift():
    # T = 1: at high T the softmax is nearly flat and the 1e-8 guarding the Pearson denominator (and
    # float32 rounding) leave a residue of order T^2 * 1e-6.
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    assert DISTTerm(T=1.0)(context(logits, logits.clone())).item() == pytest.approx(0.0, abs=1e-5)
    # Softmax ignores a per-sample shift, so the relations are unchanged.
    shifted = logits + torch.randn(6, 1)
    assert DISTTerm(T=1.0)(context(shifted, logits)).item() == pytest.approx(0.0, abs=1e-5)
    assert DISTTerm(T=4.0)(context(logits, logits.clone())).item() == pytest.approx(0.0, abs=1e-3)


# --- MLKD ---------------------------------------------------------------------------------------------

def test_mlkd_matches_the_three_levels_summed_over_temperatures():
    term = MLKDTerm(temperatures=[2, 3], instance_weight=1.0, batch_weight=2.0, class_weight=0.5)
    expected = mlkd_reference(STUDENT, TEACHER, [2.0, 3.0], (1.0, 2.0, 0.5))
    assert term(context(STUDENT, TEACHER)).item() == pytest.approx(expected, rel=1e-5)


def test_mlkd_levels_can_be_switched_off_one_by_one():
    for weights in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]:
        term = MLKDTerm(temperatures=[4.0], instance_weight=weights[0], batch_weight=weights[1],
                        class_weight=weights[2])
        expected = mlkd_reference(STUDENT, TEACHER, [4.0], weights)
        assert term(context(STUDENT, TEACHER)).item() == pytest.approx(expected, rel=1e-5)


def test_mlkd_is_zero_for_identical_logits_and_rejects_bad_temperatures():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    assert MLKDTerm()(context(logits, logits.clone())).item() == pytest.approx(0.0, abs=1e-6)
    for temperatures in ([], [2.0, 0.0]):
        with pytest.raises(KdrunError, match="temperatures"):
            build_loss({"terms": {"mlkd": {"type": "mlkd", "temperatures": temperatures}}})


STRONG_STUDENT = [[1.0, 0.0, 0.5, -0.5], [0.0, 2.0, 1.0, 0.0], [1.5, -1.0, 0.0, 0.5]]
STRONG_TEACHER = [[2.0, 0.0, 1.0, 0.0], [-0.5, 2.5, 0.5, 0.0], [1.0, 0.0, -1.0, 2.0]]


def augmented_context(student=STUDENT, teacher=TEACHER, strong_student=STRONG_STUDENT, strong_teacher=STRONG_TEACHER):
    ctx = context(student, teacher, TARGETS)
    ctx.student_logits_strong = torch.tensor(strong_student)
    ctx.teacher_logits_strong = torch.tensor(strong_teacher)
    return ctx


def test_mlkd_prediction_augmentation_matches_the_masked_reference():
    term = MLKDTerm(temperatures=[2, 4], instance_weight=1.0, batch_weight=2.0, class_weight=0.5, augment=True)
    expected = mlkd_augmented_reference(STUDENT, TEACHER, STRONG_STUDENT, STRONG_TEACHER, [2.0, 4.0], (1.0, 2.0, 0.5))
    assert term(augmented_context()).item() == pytest.approx(expected, rel=1e-5)
    # The masks matter: the unmasked one-view loss plus the strong instance term is a different number.
    unmasked = mlkd_reference(STUDENT, TEACHER, [2.0, 4.0], (1.0, 2.0, 0.5))
    assert abs(expected - unmasked) > 1e-3


def test_mlkd_augmented_is_zero_when_the_student_copies_the_teacher_on_both_views():
    ctx = augmented_context(student=TEACHER, strong_student=STRONG_TEACHER)
    assert MLKDTerm(augment=True)(ctx).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KdrunError, match="augment=false"):  # no strong view computed
        MLKDTerm(augment=True)(context(STUDENT, TEACHER))


def test_cross_entropy_covers_the_strong_view_when_there_is_one():
    from kdrun.distill.response import CrossEntropyTerm

    def ce(rows):
        return -sum(math.log(softmax(row)[y]) for row, y in zip(rows, TARGETS)) / len(rows)

    assert CrossEntropyTerm()(context(STUDENT, TEACHER, TARGETS)).item() == pytest.approx(ce(STUDENT), rel=1e-6)
    assert CrossEntropyTerm()(augmented_context()).item() == pytest.approx(ce(STUDENT) + ce(STRONG_STUDENT), rel=1e-6)


def test_mlkd_config_asks_for_the_strong_view_by_default():
    from kdrun.distill import needs_strong_view

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["distill=mlkd"])
        off = compose(config_name="config", overrides=["distill=mlkd", "distill.terms.mlkd.augment=false"])
    for config, wanted in ((cfg, True), (off, False)):
        distill = OmegaConf.to_container(config.distill, resolve=True)
        assert needs_strong_view(distill) is wanted and build_loss(distill).needs_strong_view is wanted


# --- logit standardization ----------------------------------------------------------------------------

def test_kd_with_logit_standardization_matches_manual_zscore():
    T = 2.0
    expected = T * T * sum(kl(softmax(zscore(t), T), softmax(zscore(s), T))
                           for s, t in zip(STUDENT, TEACHER)) / len(STUDENT)
    got = KDTerm(T=T, logit_standardize=True)(context(STUDENT, TEACHER))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Off by default: plain KD.
    plain = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(STUDENT, TEACHER)) / len(STUDENT)
    assert KDTerm(T=T)(context(STUDENT, TEACHER)).item() == pytest.approx(plain, rel=1e-5)


def test_logit_standardization_ignores_the_students_logit_shift_and_scale():
    # The paper's point: the student need not match the teacher's logit range, only its relations.
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    rescaled = 3.0 * student + torch.tensor([[1.0], [-2.0], [5.0]])
    for term in (KDTerm(logit_standardize=True), DKDTerm(warmup_epochs=0, logit_standardize=True),
                 MLKDTerm(logit_standardize=True, standardize_levels="all")):
        base = term(context(student, teacher, TARGETS)).item()
        assert term(context(rescaled, teacher, TARGETS)).item() == pytest.approx(base, rel=1e-4)


def test_dkd_and_mlkd_standardize_before_dividing_by_t():
    manual_s = torch.tensor([zscore(row) for row in STUDENT])
    manual_t = torch.tensor([zscore(row) for row in TEACHER])
    for standardized, plain in [(DKDTerm(T=2.0, warmup_epochs=0, logit_standardize=True),
                                 DKDTerm(T=2.0, warmup_epochs=0)),
                                (MLKDTerm(temperatures=[2, 4], logit_standardize=True, standardize_levels="all"),
                                 MLKDTerm(temperatures=[2, 4]))]:
        got = standardized(context(STUDENT, TEACHER, TARGETS)).item()
        assert got == pytest.approx(plain(context(manual_s, manual_t, TARGETS)).item(), rel=1e-5)


# --- every term: gradients, and the method presets ----------------------------------------------------

@pytest.mark.parametrize("term", [KDTerm(logit_standardize=True), DKDTerm(warmup_epochs=0), DISTTerm(T=4.0),
                                  MLKDTerm(), DKDTerm(warmup_epochs=0, logit_standardize=True)])
def test_gradients_reach_the_student_logits(term):
    torch.manual_seed(0)
    student = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10, requires_grad=True)
    loss = term(context(student, teacher, torch.randint(0, 10, (8,))))
    assert term.needs_teacher and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def compose_distill(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.distill, resolve=True)


@pytest.mark.parametrize("method", ["dkd", "dist", "mlkd"])
def test_method_presets_compose_and_build(method):
    distill = compose_distill(f"distill={method}", "T=2")
    assert distill["name"] == method and set(distill["terms"]) == {"ce", method}
    loss = build_loss(distill)
    assert loss.needs_teacher
    torch.manual_seed(0)
    student = torch.randn(16, 10, requires_grad=True)
    strong = torch.randn(16, 10, requires_grad=True)  # a strong view, as MLKD's augmentation makes
    total, parts = loss(StepContext(student, torch.randint(0, 10, (16,)), torch.arange(16),
                                    torch.randn(16, 10), epoch=30, student_logits_strong=strong,
                                    teacher_logits_strong=torch.randn(16, 10)))
    assert set(parts) == {"ce", method} and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.isfinite(strong.grad).all()  # the cross-entropy term trains on it too
    if method != "mlkd":  # MLKD keeps its own list of temperatures
        assert loss.terms[method].T == 2.0


def test_dkd_preset_defaults_and_overrides():
    term = build_loss(compose_distill("distill=dkd")).terms["dkd"]
    assert (term.alpha, term.beta, term.T, term.warmup_epochs, term.logit_standardize) == (1.0, 8.0, 4.0, 20, False)
    term = build_loss(compose_distill("distill=dkd", "distill.terms.dkd.beta=2", "alpha=0.3")).terms["dkd"]
    assert (term.alpha, term.beta) == (1.0, 2.0)  # the top-level alpha is not DKD's alpha


def test_logit_standardize_switch_reaches_the_terms():
    for method in ("kd", "dkd", "mlkd"):
        assert not build_loss(compose_distill(f"distill={method}")).terms[method].logit_standardize
        on = build_loss(compose_distill(f"distill={method}", "distill.logit_standardize=true"))
        assert on.terms[method].logit_standardize


def test_mlkd_preset_defaults():
    term = build_loss(compose_distill("distill=mlkd")).terms["mlkd"]
    assert term.temperatures == (2.0, 3.0, 4.0, 5.0, 6.0) and term.level_weights == (1.0, 1.0, 1.0)
    term = build_loss(compose_distill("distill=mlkd", "distill.terms.mlkd.temperatures=[1,2]")).terms["mlkd"]
    assert term.temperatures == (1.0, 2.0)


# --- MLKD options for the authors' behaviour, float64 ---------------------------------------------------

def double_augmented_context():
    ctx = context(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64), TARGETS)
    ctx.student_logits_strong = torch.tensor(STRONG_STUDENT, dtype=torch.float64)
    ctx.teacher_logits_strong = torch.tensor(STRONG_TEACHER, dtype=torch.float64)
    return ctx


def mlkd_batch_fraction_reference(s_weak, t_weak, s_strong, t_strong, temperatures, weights, standardize=False):
    """The authors' masking: each unmasked batch-mean level times the fraction of kept samples (classes for
    the class level); with `standardize`, only the instance-level KL (both views) sees z-scored logits."""
    n, k = len(t_weak), len(t_weak[0])
    p1 = [softmax(row) for row in t_weak]
    confidence = [max(p) for p in p1]
    kept = sum(c <= statistics.median(confidence) for c in confidence) / n
    class_confidence = [sum(p[a] for p in p1) for a in range(k)]
    kept_classes = sum(c <= statistics.median(class_confidence) for c in class_confidence) / k
    inst = (lambda rows: [zscore(r) for r in rows]) if standardize else (lambda rows: rows)
    total = 0.0
    for T in temperatures:
        instance = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(inst(s_weak), inst(t_weak))) / n
        strong = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(inst(s_strong), inst(t_strong))) / n
        levels = mlkd_reference(s_weak, t_weak, [T], (0.0, 1.0, 0.0)), mlkd_reference(s_weak, t_weak, [T], (0, 0, 1.0))
        total += (weights[0] * (instance * kept + strong) + weights[1] * levels[0] * kept
                  + weights[2] * levels[1] * kept_classes)
    return total


def test_mlkd_batch_fraction_masking_matches_the_authors_scaling():
    term = MLKDTerm(temperatures=[2, 4], instance_weight=1.0, batch_weight=2.0, class_weight=0.5, augment=True,
                    mask="batch_fraction")
    expected = mlkd_batch_fraction_reference(STUDENT, TEACHER, STRONG_STUDENT, STRONG_TEACHER, [2.0, 4.0],
                                             (1.0, 2.0, 0.5))
    assert term(double_augmented_context()).item() == pytest.approx(expected, rel=1e-12)
    per_sample = MLKDTerm(temperatures=[2, 4], instance_weight=1.0, batch_weight=2.0, class_weight=0.5, augment=True)
    assert abs(per_sample(double_augmented_context()).item() - expected) > 1e-3   # the default differs
    with pytest.raises(KdrunError, match="mask"):
        MLKDTerm(mask="per_batch")


def test_mlkd_logit_standardization_touches_the_instance_level_only_by_default():
    term = MLKDTerm(temperatures=[2, 3, 5, 2, 6], augment=True, mask="batch_fraction", logit_standardize=True)
    expected = mlkd_batch_fraction_reference(STUDENT, TEACHER, STRONG_STUDENT, STRONG_TEACHER, [2, 3, 5, 2, 6],
                                             (1.0, 1.0, 1.0), standardize=True)
    assert term(double_augmented_context()).item() == pytest.approx(expected, rel=1e-12)
    # One view, no masks: z-scored instance KL plus the raw batch and class levels.
    one_view = MLKDTerm(temperatures=[2.0], logit_standardize=True)
    s64, t64 = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    expected = (mlkd_reference([zscore(r) for r in STUDENT], [zscore(r) for r in TEACHER], [2.0], (1.0, 0, 0))
                + mlkd_reference(STUDENT, TEACHER, [2.0], (0, 1.0, 1.0)))
    assert one_view(context(s64, t64)).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(KdrunError, match="standardize_levels"):
        MLKDTerm(standardize_levels="batch")


def test_presets_carry_the_authors_released_defaults():
    def terms(*overrides):
        distill = compose_distill(*overrides)
        return {name: spec for name, spec in distill["terms"].items()}, distill

    dist, _ = terms("distill=dist")
    assert dist["dist"]["weight"] == 2.0 and (dist["dist"]["beta"], dist["dist"]["gamma"]) == (1.0, 1.0)
    mlkd, _ = terms("distill=mlkd")
    assert (mlkd["ce"]["weight"], mlkd["mlkd"]["weight"], mlkd["mlkd"]["mask"]) == (0.1, 0.9, "sample")
    kd_ls, method = terms("distill=kd_ls", "T=4")
    assert method["logit_standardize"] and (kd_ls["ce"]["weight"], kd_ls["kd"]["weight"], kd_ls["kd"]["T"]) == (0.1, 9.0, 2.0)
    loss = build_loss(compose_distill("distill=dkd_ls"))
    dkd = loss.terms["dkd"]
    assert (dkd.alpha, dkd.beta, dkd.T, dkd.logit_standardize, loss.weights["ce"]) == (9.0, 72.0, 2.0, True, 1.0)
    loss = build_loss(compose_distill("distill=mlkd_ls"))
    mlkd = loss.terms["mlkd"]
    assert mlkd.temperatures == (2.0, 3.0, 5.0, 2.0, 6.0) and mlkd.logit_standardize
    assert mlkd.standardize_levels == "instance" and mlkd.needs_strong_view
    assert (loss.weights["ce"], loss.weights["mlkd"]) == (0.1, 9.0)


@pytest.mark.parametrize("experiment,weight", [("cifar100_wrn_40_2_wrn_16_2", 5.0), ("cifar100_resnet32x4_resnet8x4", 5.0),
                                               ("cifar100_resnet32x4_shufflenetv2", 8.0),
                                               ("cifar100_resnet56_resnet20", 0.6), ("cifar100_vgg13_vgg8", 1.0)])
def test_experiment_files_set_the_reviewkd_authors_weight_per_pair(experiment, weight):
    distill = compose_distill("distill=reviewkd", f"experiment={experiment}")
    assert distill["terms"]["reviewkd"]["weight"] == weight
    # Another method is untouched by the pair's ReviewKD weight.
    assert set(compose_distill(f"experiment={experiment}")["terms"]) == {"ce", "kd"}
