"""The Hinton KD loss against hand-computed values, and its properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.distill import StepContext, build_loss
from kdrun.distill.response import kd_divergence


def kd_config(alpha: float, T: float) -> dict:
    return {"terms": {"ce": {"type": "ce", "weight": 1 - alpha}, "kd": {"type": "kd", "weight": alpha, "T": T}}}


def softmax(values, T):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_term_matches_hand_computation():
    student, teacher, T = [1.0, 2.0, 3.0], [3.0, 1.0, 0.5], 2.0
    p_teacher, p_student = softmax(teacher, T), softmax(student, T)
    expected = T * T * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_teacher, p_student))
    got = kd_divergence(torch.tensor([student]), torch.tensor([teacher]), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Worked out by hand: p_teacher = (0.6045, 0.2224, 0.1732), p_student = (0.1863, 0.3072, 0.5065),
    # KL = 0.4536, times T^2 = 4.
    assert got.item() == pytest.approx(4 * 0.4536, abs=1e-3)


def test_kd_is_batch_mean_and_zero_for_identical_logits():
    logits = torch.randn(4, 5)
    assert kd_divergence(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    pair = kd_divergence(torch.cat([a, a]), torch.cat([b, b]), 3.0)
    assert pair.item() == pytest.approx(kd_divergence(a, b, 3.0).item(), rel=1e-6)


def test_t_squared_scaling():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    for T in (1.0, 2.0, 4.0, 8.0):
        raw = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
        assert kd_divergence(s, t, T).item() == pytest.approx(T * T * raw.item(), rel=1e-5)


def test_total_loss_is_hinton_weighted_sum():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    alpha, T = 0.7, 3.0
    total, parts = build_loss(kd_config(alpha, T))(StepContext(s, y, torch.arange(6), t))
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_divergence(s, t, T)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"ce", "kd"}


def test_alpha_zero_gives_cross_entropy_gradients():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (8,))
    teacher_logits = torch.randn(8, 5)
    s1 = torch.randn(8, 5, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    loss = build_loss(kd_config(0.0, 4.0))
    assert not loss.needs_teacher  # the zero-weight KD term is not even computed
    loss(StepContext(s1, y, torch.arange(8), teacher_logits))[0].backward()
    F.cross_entropy(s2, y).backward()
    assert torch.equal(s1.grad, s2.grad)


def test_unknown_term_type_is_a_clear_error():
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError, match="did you mean 'kd'"):
        build_loss({"terms": {"x": {"type": "kdd", "weight": 1.0}}})
