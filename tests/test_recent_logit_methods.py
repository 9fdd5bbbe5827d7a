"""NKD, TTM, WTTM and CTKD against reference formulas written from their papers (float64, plain Python)."""
import math

import pytest
import torch

from kdrun.distill import StepContext, build_loss
from kdrun.distill.ctkd import CTKDTerm, curriculum_strength
from kdrun.distill.nkd import NKDTerm
from kdrun.distill.ttm import TTMTerm, WTTMTerm
from test_response_losses import kl, softmax  # the same plain-Python references

STUDENT = [[2.0, 1.0, 0.1, -1.0, 0.3], [0.5, 0.5, 2.5, 0.0, -0.7], [-1.0, 3.0, 0.0, 1.0, 0.2]]
TEACHER = [[3.0, 0.5, 0.0, -0.5, 1.0], [0.0, 1.0, 3.0, -1.0, 0.4], [0.5, 2.0, 1.0, 0.0, -2.0]]
TARGETS = [0, 2, 3]


def context(student=STUDENT, teacher=TEACHER, epoch=0, grad=False):
    s = torch.tensor(student, dtype=torch.float64, requires_grad=grad)
    return StepContext(s, torch.tensor(TARGETS), torch.arange(len(student)),
                       torch.tensor(teacher, dtype=torch.float64), epoch=epoch)


# --- NKD ------------------------------------------------------------------------------------------------

def nkd_reference(student, teacher, targets, gamma, lam):
    """Yang et al. 2023: -T_t log S_t - gamma lambda^2 sum_{i != t} N(T_i^lambda) log N(S_i^lambda),
    N(p_i) = p_i / (1 - p_t): the full softmax renormalized over the non-target classes."""
    total = 0.0
    for s, t, y in zip(student, teacher, targets):
        target = -softmax(t)[y] * math.log(softmax(s)[y])
        p_t, p_s = softmax(t, lam), softmax(s, lam)
        non_target = -sum(p_t[i] / (1 - p_t[y]) * math.log(p_s[i] / (1 - p_s[y])) for i in range(len(s)) if i != y)
        total += target + gamma * lam ** 2 * non_target
    return total / len(student)


@pytest.mark.parametrize("gamma,lam", [(1.5, 1.0), (1.0, 2.5)])
def test_nkd_matches_the_papers_loss(gamma, lam):
    got = NKDTerm(gamma=gamma, T=lam)(context()).item()
    assert got == pytest.approx(nkd_reference(STUDENT, TEACHER, TARGETS, gamma, lam), rel=1e-12)


def test_nkd_gradient_vanishes_on_the_non_target_part_when_the_student_copies_the_teacher():
    # A cross-entropy, so not zero at a copy; but with gamma alone (target part aside) a copied non-target
    # distribution is its minimum: the gradient of the non-target part w.r.t. the non-target logits is 0 there.
    ctx = context(student=TEACHER, grad=True)
    term = NKDTerm(gamma=1.0, T=2.0)
    full = term(ctx)
    full.backward()
    target_only = NKDTerm(gamma=0.0, T=2.0)
    ctx2 = context(student=TEACHER, grad=True)
    target_only(ctx2).backward()
    others = ~torch.nn.functional.one_hot(torch.tensor(TARGETS), 5).bool()
    difference = (ctx.student_logits.grad - ctx2.student_logits.grad)[others]
    assert difference.abs().max().item() < 1e-12


# --- TTM / WTTM ------------------------------------------------------------------------------------------

def ttm_reference(student, teacher, T, weighted):
    """Zheng & Yang 2024: KL(p_t^gamma / sum p_t^gamma || softmax(z_s)), gamma = 1/T, times U = sum p_t^gamma
    for WTTM, averaged over the batch."""
    total = 0.0
    for s, t in zip(student, teacher):
        powered = [p ** (1 / T) for p in softmax(t)]
        u = sum(powered)
        value = kl([p / u for p in powered], softmax(s))
        total += u * value if weighted else value
    return total / len(student)


@pytest.mark.parametrize("cls,weighted", [(TTMTerm, False), (WTTMTerm, True)])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ttm_and_wttm_match_the_papers_losses(cls, weighted, T):
    got = cls(T=T)(context()).item()
    assert got == pytest.approx(ttm_reference(STUDENT, TEACHER, T, weighted), rel=1e-12)


@pytest.mark.parametrize("cls", [TTMTerm, WTTMTerm])
def test_ttm_is_zero_when_the_student_matches_the_transformed_teacher(cls):
    transformed = [[v / 4.0 for v in row] for row in TEACHER]    # softmax(z_t / T): the transformed teacher
    assert cls(T=4.0)(context(student=transformed)).item() == pytest.approx(0.0, abs=1e-15)
    assert cls(T=4.0)(context(student=TEACHER)).item() > 1e-3    # the untransformed teacher is not the target


# --- CTKD ------------------------------------------------------------------------------------------------

def test_ctkd_curriculum_rises_along_half_a_cosine():
    assert [curriculum_strength(e, 10) for e in (0, 5, 10, 30)] == pytest.approx([0.0, 0.5, 1.0, 1.0], abs=1e-15)
    assert curriculum_strength(2, 10) == pytest.approx(0.5 * (1 + math.cos(1.2 * math.pi)), rel=1e-15)


def test_ctkd_is_kd_at_the_learned_temperature_whose_gradient_is_reversed():
    term = CTKDTerm(t_start=1.0, t_range=20.0).double()
    with torch.no_grad():
        term.theta.fill_(0.3)   # exactly 0.3 in float64 (a float32 initial value would round it)
    T = 1.0 + 20.0 / (1 + math.exp(-0.3))
    expected = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(STUDENT, TEACHER)) / len(STUDENT)
    ctx = context(epoch=5, grad=True)
    loss = term(ctx)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-12)
    assert term.T == pytest.approx(T, rel=1e-15)
    loss.backward()
    # The reference gradient w.r.t. theta, without reversal, by autograd on the formula in torch.
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    temperature = 1.0 + 20.0 * torch.sigmoid(theta)
    s, t = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    p_t = torch.softmax(t / temperature, dim=1)
    reference = temperature ** 2 * (p_t * (p_t.log() - torch.log_softmax(s / temperature, dim=1))).sum() / 3
    reference.backward()
    assert term.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-12)   # lambda = 0.5 at epoch 5
    assert ctx.student_logits.grad.abs().sum() > 0


def test_ctkd_is_zero_when_the_student_copies_the_teacher_and_its_temperature_is_saved():
    term = CTKDTerm().double()
    assert term(context(student=TEACHER)).item() == pytest.approx(0.0, abs=1e-15)
    assert "theta" in dict(term.named_parameters())   # trained by the student's optimizer, kept in checkpoints
    loss = build_loss({"terms": {"ce": {"type": "ce", "weight": 0.1}, "ctkd": {"type": "ctkd", "weight": 0.9}}})
    assert list(loss.parameters()) and loss.needs_teacher
